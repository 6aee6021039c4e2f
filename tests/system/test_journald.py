"""Journal records of a real daemon, read back from a private systemd-journald:
the fields, no destination at the default level, and logging under the filter.

PID 1 here is not systemd, and JournalHandler-type code drops records
silently when no journal socket exists, so these tests never trust the
handler: they read every record back with ``journalctl -o json``.

    unshare --mount --pid --fork       a private mount and PID namespace in which
      tmpfs on /run                    /run/systemd/journal/socket is ours alone,
      bind lab dir on /run/log/journal the journal files land in the lab directory,
      exec systemd-journald            and journald is that namespace's PID 1.

    nsenter --target <journald> --mount --net=<client netns> -- metaproxy --log-target journal

The daemon joins journald's mount namespace (so it sees the private socket)
and the lab's client namespace (so the REDIRECT rules reach it). It does not
join the PID namespace, so the test signals it by its own PID. /proc is left
as it is (no --mount-proc): a /proc of journald's PID namespace would not show
the daemon, and /proc/self would not resolve for it. The routes are
ranges (topology.privacy_config): no destination port of these tests is
written literally anywhere, so finding one in a record is a leak.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.preconditions import unmet
from tests.system import clients
from tests.system.daemon import NOBODY, SECCOMP, UNPRIVILEGED, Daemon, metaproxy_argv, next_port
from tests.system.lab import REPO, SYSPATH, WEB4, Lab, LabError, Process, clean_env, run
from tests.system.peers import INDEX, World
from tests.system.topology import (PRIVATE_DOWN_PORT, PRIVATE_HTTP_PORT, PRIVATE_SILENT_PORT,
                                   PRIVATE_UNMATCHED_PORT, privacy_config)

JOURNALD = "/lib/systemd/systemd-journald"
IDENTIFIER = "subgraph_metaproxy"
REQUEST = b"GET / HTTP/1.0\r\n\r\n"
PORTS = [PRIVATE_HTTP_PORT, PRIVATE_DOWN_PORT, PRIVATE_SILENT_PORT, PRIVATE_UNMATCHED_PORT]
LEAK = re.compile("|".join([r"198\.51\.100\.\d+", r"2001:0?db8:0?0?0?2:"]
                           + [rf"(?<!\d){p}(?!\d)" for p in PORTS]), re.IGNORECASE)

# Volatile storage only; no kernel messages in, nothing forwarded out (the
# host's kmsg and console stay untouched); no rate limit to lose records to.
JOURNALD_CONF = """\
[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
"""
BOX = """\
set -e
mount -t tmpfs -o mode=0755 mpj-run /run
mkdir -p /run/systemd/journal /run/log/journal /run/systemd/journald.conf.d
mount --bind "$0" /run/log/journal
cp "$1" /run/systemd/journald.conf.d/metaproxy-test.conf
exec "$2"
"""


def _require() -> None:
    """Fail (never skip silently) when the journal tools are missing."""
    missing = [p for p in (JOURNALD,) if not os.access(p, os.X_OK)]
    missing += [b for b in ("journalctl", "nsenter", "unshare") if shutil.which(b, path=SYSPATH) is None]
    if not missing:
        return
    reason = f"missing {', '.join(missing)} (package systemd / util-linux)"
    unmet(reason)


@dataclass
class PrivateJournal:
    """A systemd-journald alone in its own mount and PID namespace."""
    box: Process
    directory: Path
    pid: int  # journald's PID as this (the host's) PID namespace sees it

    def records(self) -> list[dict[str, Any]]:
        proc = run(["journalctl", "--directory", str(self.directory), "--output", "json", "--no-pager",
                    "--all"], timeout=20)
        return [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]

    def ours(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("SYSLOG_IDENTIFIER") == IDENTIFIER]

    def wait_for(self, done: Callable[[list[dict[str, Any]]], bool], what: str,
                 timeout: float = 10) -> list[dict[str, Any]]:
        """Poll (bounded in time and count) until done(our records) holds."""
        records: list[dict[str, Any]] = []
        for _ in range(int(timeout / 0.1) + 1):
            records = self.ours()
            if done(records):
                return records
            time.sleep(0.1)
        raise AssertionError(f"no {what} in the journal after {timeout}s; it holds:\n"
                             + "\n".join(str(r.get("MESSAGE")) for r in records))


def _start_journal(lab: Lab, name: str) -> PrivateJournal:
    directory = lab.tmp / f"{name}-files"
    directory.mkdir(mode=0o755)
    conf = lab.file(f"{name}.conf", JOURNALD_CONF)
    box = lab.spawn(None, name, ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                                 "--kill-child", "sh", "-c", BOX, str(directory), str(conf),
                                 JOURNALD])
    # The box's only child is the namespace's PID 1, which became journald.
    for _ in range(200):
        if not box.alive():
            raise LabError(f"the journald box exited {box.popen.returncode}:\n{box.output()}")
        pid = _only_child(box.pid)
        if pid and _socket_exists(pid):
            return PrivateJournal(box, directory, pid)
        time.sleep(0.05)
    raise LabError(f"systemd-journald did not create its socket in 10s:\n{box.output()}")


def _only_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


def _socket_exists(pid: int) -> bool:
    # Look through its root at its mounts: /proc/PID/root is the namespace's view.
    return Path(f"/proc/{pid}/root/run/systemd/journal/socket").is_socket() and \
        Path(f"/proc/{pid}/comm").read_text().strip() == "systemd-journal"


@pytest.fixture
def journal(world: World) -> Iterator[PrivateJournal]:
    _require()
    name = f"journald-{next_port()}"
    private = _start_journal(world.lab, name)
    try:
        yield private
    finally:
        # journald is a PID namespace's init: only SIGKILL reaches it. Killing the
        # unshare process (by PID) takes it along (--kill-child).
        if private.box.popen.poll() is None:
            os.kill(private.box.pid, signal.SIGKILL)
        private.box.stop(grace=2)


@pytest.fixture
def journal_daemon(world: World, journal: PrivateJournal) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, config: Callable[[int], str] = privacy_config) -> Daemon:
        port = next_port()
        name = f"metaproxy-journal-{port}"
        path = world.lab.file(f"{name}.conf", config(port))
        daemon = Daemon(world.lab, name, path, port, args, UNPRIVILEGED)
        argv = metaproxy_argv(["-c", str(path), "--log-target", "journal", *args])
        if UNPRIVILEGED:
            argv = NOBODY + argv + ["--unprivileged"]
        # Without --pid, nsenter execs the daemon: the recorded PID is the daemon's.
        daemon.process = world.lab.spawn(None, name, [
            "nsenter", f"--target={journal.pid}", "--mount", f"--net=/run/netns/{world.lab.client.name}",
            "--", *argv], cwd=REPO, env=clean_env(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1"))
        started.append(daemon)
        daemon._wait_listening(15)
        world.lab.redirect_to(port)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()


def _drive(world: World, daemon: Daemon) -> None:
    """One relayed fetch, one port without a route, one upstream that is down."""
    got = clients.curl(world.client, clients.url(WEB4, PRIVATE_HTTP_PORT))
    assert got.ok and got.body == INDEX.encode(), f"{got.stderr}\ndaemon stderr:\n{daemon.log()}"
    for port in (PRIVATE_UNMATCHED_PORT, PRIVATE_DOWN_PORT):
        outcome = clients.exchange(world.client, WEB4, port, REQUEST, timeout=10)
        assert outcome.reset, f"port {port}: {outcome}"


def _closes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "METAPROXY_BYTES_DOWN" in r]


def _refusals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if " refused: " in r.get("MESSAGE", "")]


def _driven(records: list[dict[str, Any]]) -> bool:
    return len(_closes(records)) >= 1 and len(_refusals(records)) >= 2


def _with_connections(port: int) -> str:
    """privacy_config with log_connections = yes: the relayed fetch gets open and close records."""
    return privacy_config(port).replace("[upstreams]", "log_connections = yes\n[upstreams]", 1)


def test_records_carry_identifier_priority_and_connection_fields(
        world: World, journal: PrivateJournal, journal_daemon: Callable[..., Daemon]) -> None:
    """Every record has SYSLOG_IDENTIFIER and PRIORITY; a relayed connection's close
    record has its cid, upstream, bytes each way, duration and reason; a refusal is
    a warning with its cid and reason (log_connections = yes)."""
    daemon = journal_daemon(config=_with_connections)
    _drive(world, daemon)
    records = journal.wait_for(_driven, "close record and two refusals")

    for record in records:
        assert record["PRIORITY"] in {"2", "3", "4", "6", "7"}, record
    assert any(r["MESSAGE"].startswith("subgraph_metaproxy listening on") and r["PRIORITY"] == "6"
               for r in records), [r["MESSAGE"] for r in records]

    close, = _closes(records)
    assert close["PRIORITY"] == "6"
    assert close["METAPROXY_UPSTREAM"] == "dante"
    assert int(close["METAPROXY_BYTES_UP"]) >= len("GET / HTTP/1.1\r\n")
    assert int(close["METAPROXY_BYTES_DOWN"]) > len(INDEX)  # headers and the page
    assert float(close["METAPROXY_DURATION"]) >= 0.0
    assert close["METAPROXY_REASON"]
    assert close["CODE_FILE"].endswith("relay/server.py"), close["CODE_FILE"]
    opened = [r for r in records if r.get("METAPROXY_CID") == close["METAPROXY_CID"] and " open via " in r["MESSAGE"]]
    assert len(opened) == 1 and opened[0]["METAPROXY_UPSTREAM"] == "dante", opened

    refusals = _refusals(records)
    assert len(refusals) == 2, refusals
    assert all(r["PRIORITY"] == "4" and r["METAPROXY_REASON"] and r["METAPROXY_CID"] for r in refusals)
    cids = [int(r["METAPROXY_CID"]) for r in [close, *refusals]]
    assert len(set(cids)) == 3, cids


def test_no_record_names_a_destination_at_the_default_level(
        world: World, journal: PrivateJournal, journal_daemon: Callable[..., Daemon]) -> None:
    """Without -d no field of any record (MESSAGE or other) holds a destination
    address or port, and there is no METAPROXY_DESTINATION field. Without
    log_connections the relayed fetch leaves no record at all: no open, no close."""
    daemon = journal_daemon()
    _drive(world, daemon)
    journal.wait_for(lambda rs: len(_refusals(rs)) >= 2, "two refusals")
    os.kill(daemon.process.pid, signal.SIGUSR1)  # type: ignore[union-attr]
    journal.wait_for(lambda rs: any(r["MESSAGE"].startswith("counters:") for r in rs), "counters")

    records = journal.records()  # journald's own records too: nothing may leak anywhere
    leaks = [r for r in records if LEAK.search(json.dumps(r))]
    assert not leaks, "destinations in journal records:\n" + "\n".join(map(json.dumps, leaks))
    assert not [r for r in records if "METAPROXY_DESTINATION" in r]
    assert any("[scrubbed]" in r.get("MESSAGE", "") for r in records)
    ours = [r for r in records if r.get("SYSLOG_IDENTIFIER") == IDENTIFIER]
    per_connection = [r["MESSAGE"] for r in ours if r in _closes(ours) or " open via " in r["MESSAGE"]]
    assert not per_connection, f"per-connection records at the default level: {per_connection}"


def test_destinations_appear_with_debug(world: World, journal: PrivateJournal,
                                        journal_daemon: Callable[..., Daemon]) -> None:
    """With -d the destination is in METAPROXY_DESTINATION and in the message, and a
    warning says once that the logs now deanonymise the user (log_connections = yes)."""
    daemon = journal_daemon("-d", config=_with_connections)
    _drive(world, daemon)
    records = journal.wait_for(_driven, "close record and two refusals")

    expected = f"{WEB4}:{PRIVATE_HTTP_PORT}"
    close, = _closes(records)
    assert close["METAPROXY_DESTINATION"] == expected
    assert expected in close["MESSAGE"]
    refused = {r["METAPROXY_DESTINATION"] for r in _refusals(records)}
    assert refused == {f"{WEB4}:{PRIVATE_UNMATCHED_PORT}", f"{WEB4}:{PRIVATE_DOWN_PORT}"}
    warnings = [r for r in records if "deanonymise" in r["MESSAGE"]]
    assert len(warnings) == 1 and warnings[0]["PRIORITY"] == "4"


def test_logging_works_under_the_seccomp_filter(
        world: World, journal: PrivateJournal, journal_daemon: Callable[..., Daemon]) -> None:
    """The journal socket is opened by the first record, before the filter loads; records
    written later, with the filter enforcing, still arrive and the daemon lives on."""
    if SECCOMP == "off":
        pytest.fail("METAPROXY_TEST_SECCOMP=off: this test needs the filter", pytrace=False)
    daemon = journal_daemon(config=_with_connections)
    assert daemon.process is not None
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), f"no seccomp filter loaded:\n{status}"
    _drive(world, daemon)
    journal.wait_for(_driven, "close record and two refusals (written under the filter)")
    assert daemon.alive(), daemon.log()
