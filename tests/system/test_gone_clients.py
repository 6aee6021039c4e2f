"""A client that is already gone costs no upstream CONNECT.

The storm: STORM clients connect through the REDIRECT and reset at once
(SO_LINGER 0, then close, right after connect), to a port routed to a counting
SOCKS5 upstream with isolation = connection, where each CONNECT would be a
fresh Tor circuit. The daemon must check the client right before dialling, and
skip the ones that are gone. The CONNECTs are counted where they land, at the
upstream; the counters line's "clients gone" must agree with the refusals.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Iterator

import pytest

from tests.system.counting import CountingUpstream, start_counting, wait_total
from tests.system.daemon import StartDaemon, daemon_section
from tests.system.lab import GATEWAY4, WEB4
from tests.system.peers import World

COUNTING_PORT = 1972
STORM = 500
STORM_SECONDS = 60      # the storm itself must end within this
DEST_PORT = 8001        # any port: the counting upstream never contacts it
# At most this share of the storm may reach the upstream: a client can still be
# there when the daemon looks (it accepted between the client's connect and its
# reset). Before the check, every one of them did.
MAX_SHARE = 0.10


@pytest.fixture
def counting(world: World) -> Iterator[CountingUpstream]:
    upstream = start_counting(world, "answer", COUNTING_PORT)
    try:
        yield upstream
    finally:
        upstream.process.stop()


def config(port: int) -> str:
    return daemon_section(port, connect_timeout=5) + f"""\
[upstreams]
    [[counting]]
    type = socks5
    address = {GATEWAY4}:{COUNTING_PORT}
    isolation = connection
[routes]
{DEST_PORT} = counting
"""


def storm(count: int, seconds: float) -> int:
    """connect, then reset at once; returns how many connects completed (bounded in time)."""
    linger = struct.pack("ii", 1, 0)
    done = 0
    deadline = time.monotonic() + seconds
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect((WEB4, DEST_PORT))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            done += 1
        except OSError:
            pass
        finally:
            sock.close()
    return done


def test_clients_that_reset_at_once_cost_no_upstream_connect(
        world: World, start_own_daemon: StartDaemon, counting: CountingUpstream) -> None:
    """A storm of 500 connect-then-reset clients through REDIRECT: the daemon sees all of
    them, but at most a tenth reach the upstream (before the check, all 500 did); the
    daemon lives on and still relays a client that stays."""
    daemon = start_own_daemon("metaproxy-gone", config)
    made = world.client.call(lambda: storm(STORM, STORM_SECONDS), timeout=STORM_SECONDS + 10)
    assert made == STORM, f"only {made} of {STORM} connects completed"

    got = wait_total(daemon, STORM, timeout=60)
    reached = counting.settle(quiet=1.0, timeout=30)
    connects = counting.connects()
    print(f"\nconnect-then-reset storm: {STORM} clients, {reached} upstream connections, "
          f"{connects} CONNECTs; daemon counters {got}")
    assert got.total == STORM and got.open == 0, f"{got}\n{daemon.log()[-3000:]}"
    assert reached <= STORM * MAX_SHARE, \
        f"{reached} of {STORM} clients that were already gone cost an upstream connection ({connects} CONNECTs)"
    # The rest were refused without asking the upstream, as clients gone (when the
    # counters line says so: 41866ea's does not).
    assert got.refused >= STORM - reached, got
    assert got.gone is None or got.gone == got.refused, got

    # A client that stays is still relayed.
    sock = world.client.connect(WEB4, DEST_PORT)
    try:
        sock.sendall(b"x")
        for _ in range(100):
            if counting.connects() > connects:
                break
            time.sleep(0.05)
    finally:
        sock.close()
    assert counting.connects() == connects + 1, daemon.log()[-3000:]
    assert daemon.alive()
