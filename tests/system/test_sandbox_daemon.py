"""The sandbox of the real daemon, seen from outside: nobody, no
privileges, not dumpable, and relaying under the kill filter.

The daemon is started as root in the lab's client namespace with `seccomp =
kill` written into its own config, whatever METAPROXY_TEST_SECCOMP says, and
must then serve as `nobody` with no capability in any set, no-new-privs, not
dumpable, and the filter loaded in every thread, while relaying through SOCKS5
(TCP and unix:/path) and HTTP CONNECT upstreams, for IPv4 and IPv6, and across
a SIGHUP reload.
"""

from __future__ import annotations

import os
import pwd
import signal
import time
from pathlib import Path

import pytest

from tests.system import clients, peers
from tests.system.daemon import Daemon, StartDaemon
from tests.system.lab import WEB4, WEB6, LabError
from tests.system.peers import World
from tests.system.topology import UPSTREAMS

NOBODY = pwd.getpwnam("nobody")
CAP_KEYS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
ROUTES = ("dante", "dante_auth", "unix_socks", "http_v6")  # socks5 tcp/unix, isolation, http over v6


def _config(port: int, unix_socket: Path, user: str = "nobody") -> str:
    lines = ["[daemon]", "listen = 127.0.0.1, ::1", f"port = {port}", f"user = {user}",
             "seccomp = kill", "[upstreams]"]
    for name in ROUTES:
        lines.append(f"    [[{name}]]")
        lines += ["    " + line for line in UPSTREAMS[name][1].format(unix_socket=unix_socket).splitlines()]
    lines += ["[routes]"] + [f"{UPSTREAMS[name][0]} = {name}" for name in ROUTES]
    return "\n".join(lines) + "\n"


def _tasks(daemon: Daemon) -> dict[str, dict[str, str]]:
    """/proc/PID/task/*/status of every thread, as dicts."""
    assert daemon.process is not None
    statuses = {}
    for task in Path(f"/proc/{daemon.process.pid}/task").iterdir():
        text = (task / "status").read_text()
        statuses[task.name] = {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    return statuses


@pytest.fixture
def sandboxed(world: World, start_own_daemon: StartDaemon) -> Daemon:
    """A daemon started as root, enforcing the filter in kill mode, with REDIRECT to it."""
    return start_own_daemon("metaproxy-sandbox", lambda port: _config(port, world.gateway.unix_socket),
                            unprivileged=False)


def _fetch_everything(world: World, daemon: Daemon) -> None:
    for name, web in (("dante", WEB4), ("dante_auth", WEB4), ("unix_socks", WEB4), ("dante", WEB6),
                      ("http_v6", WEB6)):
        got = clients.curl(world.client, clients.url(web, UPSTREAMS[name][0], "/index.html"))
        assert got.ok and got.body.decode() == peers.INDEX, (
            f"via {name} to {web}: {got.stderr}\ndaemon:\n{daemon.log()[-3000:]}")


def test_every_thread_of_the_serving_daemon_is_nobody_without_privileges(world: World,
                                                                          sandboxed: Daemon) -> None:
    """Started as root, every thread of the serving daemon has nobody's uid and gid (real,
    effective, saved, fs), no supplementary group, every capability set and the bounding
    set empty, no-new-privs, and the seccomp filter (mode 2)."""
    _fetch_everything(world, sandboxed)  # threads the relay starts are included
    for task, status in _tasks(sandboxed).items():
        assert status["Uid"].split() == [str(NOBODY.pw_uid)] * 4, (task, status["Uid"])
        assert status["Gid"].split() == [str(NOBODY.pw_gid)] * 4, (task, status["Gid"])
        assert status["Groups"] == "", (task, status["Groups"])
        for key in CAP_KEYS:
            assert int(status[key], 16) == 0, (task, key, status[key])
        assert status["NoNewPrivs"] == "1", (task, status)
        assert status["Seccomp"] == "2" and int(status.get("Seccomp_filters", "1")) >= 1, (task, status)


def test_serving_daemon_is_not_dumpable(sandboxed: Daemon) -> None:
    """The kernel gives a non-dumpable process's /proc files to root: the daemon runs as
    nobody, yet its /proc/PID/status belongs to uid 0, so nobody cannot ptrace it or read
    its memory."""
    assert sandboxed.process is not None
    assert _tasks(sandboxed)[str(sandboxed.process.pid)]["Uid"].split()[0] == str(NOBODY.pw_uid)
    assert os.stat(f"/proc/{sandboxed.process.pid}/status").st_uid == 0


def test_daemon_relays_under_the_kill_filter_and_across_a_reload(world: World, sandboxed: Daemon) -> None:
    """With the filter in kill mode the daemon relays through SOCKS5 over TCP and a unix
    socket, with isolation credentials, and HTTP CONNECT, to IPv4 and IPv6 destinations;
    SIGHUP re-reads the config under the filter, and it still relays and still lives."""
    assert sandboxed.process is not None
    _fetch_everything(world, sandboxed)
    mark = sandboxed.mark()
    os.kill(sandboxed.process.pid, signal.SIGHUP)
    log = sandboxed.wait_log("reloaded", since=mark)
    assert "reloaded" in log, log
    _fetch_everything(world, sandboxed)
    time.sleep(0.2)
    assert sandboxed.alive(), f"the daemon died under the filter:\n{sandboxed.log()[-3000:]}"


def test_a_failed_privilege_step_stops_the_daemon_with_exit_77(world: World,
                                                                start_own_daemon: StartDaemon) -> None:
    """A service user that does not exist stops the daemon before it serves: exit 77
    (EX_NOPERM), and the message names the step and the user."""
    with pytest.raises(LabError) as caught:
        start_own_daemon("metaproxy-nouser", lambda port: _config(
            port, world.gateway.unix_socket, user="no-such-metaproxy-user"), unprivileged=False)
    message = str(caught.value)
    assert "exited 77" in message, message
    assert "resolve service user" in message and "no-such-metaproxy-user" in message, message


def test_shared_relay_daemon_of_the_system_tier_enforces_the_kill_filter(relay: Daemon) -> None:
    """The daemon the whole relay tier runs against has the filter loaded in kill mode, so
    those tests passing means the relay works under it. METAPROXY_TEST_SECCOMP=log, trap
    or off makes this fail on purpose: such a run proves nothing about kill mode."""
    text = relay.config.read_text()
    modes = [line.split("=", 1)[1].strip() for line in text.splitlines()
             if line.replace(" ", "").startswith("seccomp=")]
    assert modes in ([], ["kill"]), f"the tier ran with seccomp = {modes}, not kill"
    assert relay.process is not None
    assert _tasks(relay)[str(relay.process.pid)]["Seccomp"] == "2"
