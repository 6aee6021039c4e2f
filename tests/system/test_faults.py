"""Faults the daemon must survive without a restart.

Each test starts a daemon of its own in the lab (start_own_daemon) and drives
it with tests/soak/traffic.py echo clients, or single round trips:

* the SOCKS server dies mid-transfer: its clients are reset (or see EOF) at
  once, none hangs, and the daemon holds nothing afterwards;
* the SOCKS server comes back: new connections work, same daemon process;
* RLIMIT_NOFILE is lowered under it (prlimit --pid): accept backs off, the
  CPU stays low, and service resumes once descriptors are free;
* SIGHUP again and again under load: no connection is dropped, no byte lost;
* SIGTERM under load: no new work, the transfers in flight finish (drain),
  then the daemon exits 0.

The upstream that gets killed is a microsocks of our own ("victim", port
VICTIM_PORT), so the shared peers of the lab are never touched; the others
go through the lab's dante, which passes half-closes on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from typing import Iterator

import pytest

from tests.soak import probe
from tests.system import peers
from tests.preconditions import unmet
from tests.system.conftest import StartDaemon
from tests.system.daemon import Daemon, daemon_section
from tests.system.lab import GATEWAY4, SYSPATH, WEB4, Lab, Namespace, Process, run
from tests.system.peers import World

VICTIM_PORT = 1180
VICTIM_ROUTE, DANTE_ROUTE = 7100, 7101  # destination ports; an echo server listens on both
DRAIN_TIMEOUT = 60


def faults_config(port: int) -> str:
    return daemon_section(port, connect_timeout=10, drain_timeout=DRAIN_TIMEOUT) + f"""\
[upstreams]
    [[victim]]
    type = socks5
    address = {GATEWAY4}:{VICTIM_PORT}
    isolation = none
    [[dante]]
    type = socks5
    address = {GATEWAY4}:{peers.DANTE_PORT}
    isolation = none
[routes]
{VICTIM_ROUTE} = victim
{DANTE_ROUTE} = dante
"""


@pytest.fixture(scope="module")
def echoes(world: World) -> list[Process]:
    return [probe.start_echo(world.lab, [WEB4], port=p, workers=1) for p in (VICTIM_ROUTE, DANTE_ROUTE)]


@pytest.fixture
def daemon(world: World, echoes: list[Process], start_own_daemon: StartDaemon) -> Daemon:
    return start_own_daemon("faults", faults_config)


@pytest.fixture
def victim(world: World) -> Iterator["Victim"]:
    v = Victim(world.lab)
    v.start()
    try:
        yield v
    finally:
        v.kill()


class Victim:
    """A microsocks in the gateway that a test may kill and start again."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.process: Process | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.process = self.lab.gateway.spawn(f"victim-{self.starts}",
                                              ["microsocks", "-i", GATEWAY4, "-p", str(VICTIM_PORT)])
        self.lab.gateway.wait_tcp(GATEWAY4, VICTIM_PORT, process=self.process)

    def kill(self) -> None:
        """SIGKILL by PID: no goodbye to anyone."""
        if self.process is not None and self.process.alive():
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.popen.wait(timeout=10)


def roundtrip(ns: Namespace, port: int, payload: bytes, timeout: float = 5) -> bytes:
    """Send payload to the echo at WEB4:port through the daemon; return what came back
    before EOF, reset or len(payload) bytes. Raises OSError on a reset."""
    sock = ns.connect(WEB4, port, timeout=timeout)
    with sock:
        sock.sendall(payload)
        got = b""
        for _ in range(10_000):
            if len(got) >= len(payload):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def settle_and_check(daemon: Daemon, before: probe.Snapshot) -> probe.Snapshot:
    assert daemon.process is not None and daemon.alive(), f"the daemon died:\n{daemon.log()[-3000:]}"
    after = probe.settle(daemon.process.pid, daemon)
    assert after.counters.open == 0 and after.counters.pipes == 0, f"left open: {after}"
    assert after.sockets == before.sockets, f"sockets leaked: before {before}, after {after}"
    for bad in ("Traceback", "internal error", "Exception in callback", "Task exception"):
        assert bad not in daemon.log(), f"{bad!r} in the daemon log:\n{daemon.log()[-4000:]}"
    return after


def wait_open(daemon: Daemon, at_least: int, timeout: float = 30) -> int:
    assert daemon.process is not None
    seen = 0
    for _ in range(int(timeout / 0.2)):
        seen = probe.counters(daemon.process.pid, daemon).open
        if seen >= at_least:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"only {seen} of {at_least} connections open after {timeout}s")


# ---- the upstream dies, and comes back ----------------------------------------------

def test_socks_server_killed_mid_transfer_resets_its_clients_not_hangs(
        world: World, daemon: Daemon, victim: Victim) -> None:
    """SIGKILL the SOCKS server while 100 clients stream through it: every client sees
    a reset or EOF within seconds (none times out), and the daemon keeps nothing."""
    assert daemon.process is not None
    before = probe.settle(daemon.process.pid, daemon)
    clients = 100
    run_ = probe.spawn_traffic(world.client, "victims", WEB4, VICTIM_ROUTE, clients, "--size", str(64 << 20),
                               "--abort-rate", "0", "--slow-rate", "0", "--late-rate", "0", "--timeout", "60")
    wait_open(daemon, clients)
    time.sleep(1.0)  # bytes are flowing
    victim.kill()
    killed = time.monotonic()
    probe.wait_all([run_], 60)
    ended = time.monotonic() - killed
    summary = probe.summary_of(run_)
    print(f"\nupstream killed under {clients} streaming clients: all ended {ended:.2f}s later; "
          f"outcomes {summary['error_kinds']}")
    assert summary["clients"] == clients
    assert summary["error_kinds"].get("timeout", 0) == 0, f"clients hung: {summary['errors']}"
    assert set(summary["error_kinds"]) <= {"reset", "eof"}, summary["errors"]
    assert ended < 10, f"the clients took {ended:.1f}s to notice"
    settle_and_check(daemon, before)


def test_upstream_restarted_serves_new_connections_without_restarting_the_daemon(
        world: World, daemon: Daemon, victim: Victim) -> None:
    """While the SOCKS server is down, clients are reset at once; once it is back, new
    connections work again through the same daemon process."""
    assert daemon.process is not None
    pid = daemon.process.pid
    payload = os.urandom(50_000)
    assert roundtrip(world.client, VICTIM_ROUTE, payload) == payload
    victim.kill()
    started = time.monotonic()
    try:
        got: bytes | None = roundtrip(world.client, VICTIM_ROUTE, payload)
    except OSError:
        got = None  # reset: what we want
    assert got in (None, b""), f"a dead upstream answered {len(got or b'')} bytes"
    assert time.monotonic() - started < 3, "a client of a dead upstream waited instead of being reset"
    # The refusal is logged just after the reset is sent: wait for the line.
    assert "is unreachable" in daemon.wait_log("is unreachable", timeout=5)
    victim.start()
    for _ in range(3):
        assert roundtrip(world.client, VICTIM_ROUTE, payload) == payload
    assert daemon.alive() and daemon.process.pid == pid


# ---- out of descriptors ----------------------------------------------------------------

def _need(tool: str) -> str:
    path = shutil.which(tool, path=SYSPATH)
    unmet(f"{tool} is missing" if path is None else None)
    assert path is not None
    return path


def _as_owner(pid: int, argv: list[str]) -> list[str]:
    """argv run with the daemon's own uid and gid.

    prlimit(2) on another process needs the same uids or CAP_SYS_RESOURCE, and
    root in this container lacks that capability; the owner needs none to lower
    its soft limit, or to raise it back up to the hard one.
    """
    ids = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("Uid:", "Gid:")):
            ids[line[:3]] = line.split()[1]
    return ["setpriv", f"--reuid={ids['Uid']}", f"--regid={ids['Gid']}", "--clear-groups", "--", *argv]


def _soft_nofile(pid: int) -> int:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line in /proc/PID/limits")


def test_out_of_descriptors_accept_backs_off_with_low_cpu_and_service_returns(
        world: World, daemon: Daemon) -> None:
    """prlimit lowers the daemon's RLIMIT_NOFILE to a few above what it holds; 60 clients
    arrive. accept fails with EMFILE and pauses (not a busy loop: under 10% CPU over
    3 s); once the clients go and descriptors are free, new connections work again."""
    prlimit = _need("prlimit")
    assert daemon.process is not None
    pid = daemon.process.pid
    payload = os.urandom(20_000)
    assert roundtrip(world.client, DANTE_ROUTE, payload) == payload
    before = probe.settle(pid, daemon)
    soft = _soft_nofile(pid)
    low = before.fds + 12
    mark = daemon.mark()
    run(_as_owner(pid, [prlimit, "--pid", str(pid), f"--nofile={low}:"]))
    held: list[socket.socket] = []
    try:
        for _ in range(60):
            held.append(world.client.connect(WEB4, DANTE_ROUTE, timeout=5))
        time.sleep(1.0)
        cpu = probe.cpu_seconds(pid)
        time.sleep(3.0)
        busy = probe.cpu_seconds(pid) - cpu
        backoffs = daemon.log_since(mark).count("pausing accepts")
        print(f"\nout of descriptors (limit {low}): {busy:.2f}s CPU in 3s, {backoffs} accept pauses logged")
        assert "Too many open files" in daemon.log_since(mark)
        assert backoffs >= 1, daemon.log_since(mark)[-3000:]
        assert busy < 0.3, f"the daemon spun: {busy:.2f}s of CPU in 3s while out of descriptors"
    finally:
        for sock in held:
            sock.close()
    # Service returns under the same low limit, once the held clients are gone.
    for attempt in range(20):
        try:
            if roundtrip(world.client, DANTE_ROUTE, payload) == payload:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail(f"no service 10s after descriptors were freed:\n{daemon.log_since(mark)[-3000:]}")
    run(_as_owner(pid, [prlimit, "--pid", str(pid), f"--nofile={soft}:"]))
    assert roundtrip(world.client, DANTE_ROUTE, payload) == payload
    settle_and_check(daemon, before)


# ---- signals under load --------------------------------------------------------------

def test_repeated_sighup_under_load_drops_nothing(world: World, daemon: Daemon) -> None:
    """SIGHUP every 0.1s while 300 clients transfer 1 MB each: no client fails, no byte
    is lost, every reload is logged, and nothing is left open."""
    assert daemon.process is not None
    pid = daemon.process.pid
    before = probe.settle(pid, daemon)
    mark = daemon.mark()
    run_ = probe.spawn_traffic(world.client, "hup-load", WEB4, DANTE_ROUTE, 300, "--size", str(1 << 20),
                               "--ramp", "1", "--timeout", "60")
    sent = 0
    for _ in range(300):  # bounded: at most 30s of signals
        if not run_.alive():
            break
        os.kill(pid, signal.SIGHUP)
        sent += 1
        time.sleep(0.1)
    probe.wait_all([run_], 60)
    summary = probe.summary_of(run_)
    reloads = daemon.log_since(mark).count("reloaded routes and upstreams")
    print(f"\nSIGHUP x{sent} under 300 clients: {reloads} reloads logged; {summary['completed']} completed, "
          f"{summary['aborted']} aborted on purpose, {summary['failed']} failed, {summary['bytes_lost']} bytes lost")
    assert summary["failed"] == 0 and summary["bytes_lost"] == 0, summary["errors"]
    assert sent >= 5, "the load ended before the signal storm began"
    assert reloads >= sent // 2, f"{sent} SIGHUPs, {reloads} reloads logged"
    assert "reload of" not in daemon.log_since(mark), "a reload failed"
    settle_and_check(daemon, before)


def test_sigterm_under_load_drains_the_transfers_then_exits_zero(world: World, daemon: Daemon) -> None:
    """SIGTERM while 200 clients are mid-transfer: the daemon stops accepting, lets every
    transfer finish (no byte lost), and exits 0 as soon as the last one is done, well
    before drain_timeout."""
    assert daemon.process is not None
    pid = daemon.process.pid
    clients = 200
    run_ = probe.spawn_traffic(world.client, "term-load", WEB4, DANTE_ROUTE, clients, "--size", str(2 << 20),
                               "--abort-rate", "0", "--slow-rate", "0.1", "--late-rate", "0",
                               "--window", "65536", "--timeout", "60")
    wait_open(daemon, clients)
    time.sleep(0.5)
    mark = daemon.mark()
    os.kill(pid, signal.SIGTERM)
    signalled = time.monotonic()
    probe.wait_all([run_], 60)
    clients_done = time.monotonic() - signalled
    try:
        code = daemon.process.popen.wait(timeout=40)
    except Exception:
        pytest.fail(f"the daemon did not exit after SIGTERM:\n{daemon.log_since(mark)[-3000:]}")
    exited = time.monotonic() - signalled
    summary = probe.summary_of(run_)
    print(f"\nSIGTERM under {clients} clients: the last client finished {clients_done:.2f}s later, the daemon "
          f"exited {code} after {exited:.2f}s; {summary['completed']} completed, {summary['failed']} failed, "
          f"{summary['bytes_lost']} bytes lost")
    assert code == 0, daemon.log_since(mark)[-3000:]
    assert summary["failed"] == 0 and summary["bytes_lost"] == 0, summary["errors"]
    assert summary["completed"] == clients
    assert "draining" in daemon.log_since(mark)
    assert exited < DRAIN_TIMEOUT and exited - clients_done < 3, \
        "the drain did not end with the last transfer"
    assert "drain time over" not in daemon.log_since(mark)
