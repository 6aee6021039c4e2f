"""SIGTERM's drain resets every client whose upstream is still being dialled, and
the books balance: "stopped: 0 open".

Two kinds of unfinished dial are cut short by the drain:

- the handshake sent, no answer: a counting upstream in "silent" mode accepts
  and never says a byte;
- the TCP connect itself pending: SYNs to a gateway port are dropped by an
  iptables rule in the gateway namespace (removed again by the test).

connect_timeout is long (60 s) and drain_timeout short (1 s), so only the
drain can end these dials.
"""

from __future__ import annotations

import signal
import socket
import time
from typing import Iterator

import pytest

from tests.system.counting import STOPPED, CountingUpstream, counters, start_counting
from tests.system.daemon import StartDaemon, daemon_section
from tests.system.lab import GATEWAY4, WEB4
from tests.system.peers import World

SILENT_PORT = 1973      # the counting upstream, silent
BLACKHOLE_PORT = 1974   # nothing answers a SYN here (dropped)
SILENT_DEST, BLACKHOLE_DEST = 8001, 8002
EACH = 4                # clients per kind
DRAIN = 1


@pytest.fixture
def silent(world: World) -> Iterator[CountingUpstream]:
    upstream = start_counting(world, "silent", SILENT_PORT)
    try:
        yield upstream
    finally:
        upstream.process.stop()


@pytest.fixture
def blackhole(world: World) -> Iterator[None]:
    rule = ["-p", "tcp", "-d", GATEWAY4, "--dport", str(BLACKHOLE_PORT), "-j", "DROP"]
    world.lab.gateway.run(["iptables", "-w", "5", "-I", "INPUT", *rule])
    try:
        yield
    finally:
        world.lab.gateway.run(["iptables", "-w", "5", "-D", "INPUT", *rule], check=False)


def config(port: int) -> str:
    return daemon_section(port, drain_timeout=DRAIN) + f"""\
[upstreams]
    [[silent]]
    type = socks5
    address = {GATEWAY4}:{SILENT_PORT}
    connect_timeout = 60
    [[blackhole]]
    type = socks5
    address = {GATEWAY4}:{BLACKHOLE_PORT}
    connect_timeout = 60
[routes]
{SILENT_DEST} = silent
{BLACKHOLE_DEST} = blackhole
"""


def test_sigterm_resets_clients_mid_dial_and_stops_with_zero_open(
        world: World, start_own_daemon: StartDaemon, silent: CountingUpstream, blackhole: None) -> None:
    """Clients whose upstream has not answered its handshake, or not even accepted the
    TCP connection, when SIGTERM arrives: each is reset within the drain time, the
    daemon exits 0, and its last line says "stopped: 0 open"."""
    daemon = start_own_daemon("metaproxy-drain", config)
    held: list[socket.socket] = []
    try:
        for dest in (SILENT_DEST, BLACKHOLE_DEST):
            for _ in range(EACH):
                sock = world.client.connect(WEB4, dest)
                sock.sendall(b"hello")
                held.append(sock)
        for _ in range(100):  # the silent upstream has all its handshakes
            if silent.accepts() >= EACH:
                break
            time.sleep(0.05)
        assert silent.accepts() == EACH, silent.process.output()
        before = counters(daemon)
        assert (before.open, before.total, before.refused) == (2 * EACH, 2 * EACH, 0), before

        assert daemon.process is not None
        mark = daemon.mark()
        started = time.monotonic()
        daemon.process.popen.send_signal(signal.SIGTERM)
        for i, sock in enumerate(held):
            sock.settimeout(DRAIN + 5)
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = None
            waited = time.monotonic() - started
            assert data is None, f"client {i} was not reset (got {data!r} after {waited:.2f}s)\n" \
                                 f"{daemon.log_since(mark)}"
            assert waited <= DRAIN + 2, f"client {i} reset after {waited:.2f}s"
        code = daemon.process.popen.wait(timeout=10)
        log = daemon.log_since(mark)
        assert code == 0, log
        found = STOPPED.search(log)
        assert found, f"no stopped: line\n{log}"
        assert found.group(0).startswith("stopped: 0 open"), f"the books do not balance:\n{log}"
        assert int(found.group(2)) == 2 * EACH, found.group(0)
    finally:
        for sock in held:
            sock.close()
