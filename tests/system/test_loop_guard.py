"""The loop guard compares with the accepted socket's own address, not the listener's.

A connection that no REDIRECT rule rewrote still has a conntrack entry once the
namespace has NAT rules (the lab's REDIRECT rules register the nat table, so
conntrack tracks every flow, loopback included): SO_ORIGINAL_DST then returns
the address the client dialled, which is the accepted socket's own local
address. The daemon must refuse exactly that, whatever ``listen`` says: with
a wildcard listener the old guard compared with 0.0.0.0 and let
192.0.2.1:PORT and 127.0.0.1:PORT through to the upstream, which connected back
to the daemon (a chain of relays).

Every daemon here routes ``*`` to a counting upstream, so a connection that
slipped past the guard would show up there as a CONNECT. The refusals must
name the loop guard: a refusal for an unknown destination (no conntrack entry)
would prove nothing about the guard.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import pytest

from tests.system import clients
from tests.system.counting import CountingUpstream, counters, start_counting
from tests.system.daemon import Daemon, StartDaemon, daemon_section
from tests.system.lab import CLIENT4, CLIENT6, GATEWAY4, WEB4, WEB6, Namespace
from tests.system.peers import World

COUNTING_PORT = 1971
REQUEST = b"GET / HTTP/1.0\r\n\r\n"
# listen value -> (addresses dialled from the client namespace, addresses dialled from
# the gateway namespace, whether REDIRECT reaches this daemon at all)
LISTENS: dict[str, tuple[str, list[str], list[str], bool]] = {
    "wildcard": ("0.0.0.0, ::", ["127.0.0.1", CLIENT4, "::1", CLIENT6], [CLIENT4, CLIENT6], True),
    "non-loopback": (f"{CLIENT4}, {CLIENT6}", [CLIENT4, CLIENT6], [CLIENT4, CLIENT6], False),
    "loopback": ("127.0.0.1, ::1", ["127.0.0.1", "::1"], [], True),
}


@pytest.fixture
def counting(world: World) -> Iterator[CountingUpstream]:
    upstream = start_counting(world, "answer", COUNTING_PORT)
    try:
        yield upstream
    finally:
        upstream.process.stop()


def _config(listen: str) -> Callable[[int], str]:
    def config(port: int) -> str:
        section = daemon_section(port, connect_timeout=5).replace("listen = 127.0.0.1, ::1",
                                                                  f"listen = {listen}")
        return section + f"""\
[upstreams]
    [[counting]]
    type = socks5
    address = {GATEWAY4}:{COUNTING_PORT}
    isolation = none
[routes]
* = counting
"""
    return config


def _direct(ns: Namespace, address: str, port: int, daemon: Daemon) -> None:
    outcome = clients.exchange(ns, address, port, REQUEST, timeout=5)
    assert outcome.reset and outcome.data == b"", \
        f"a direct connection to {address}:{port} from {ns.name} was not reset: {outcome}\n" \
        f"daemon:\n{daemon.log()[-3000:]}"
    assert outcome.seconds < 1.0, outcome


@pytest.mark.parametrize("listen", list(LISTENS))
def test_direct_connection_to_the_daemons_own_address_is_reset_and_never_reaches_the_upstream(
        world: World, start_own_daemon: StartDaemon, counting: CountingUpstream, listen: str) -> None:
    """With listen on a wildcard, a non-loopback address or loopback, over IPv4 and IPv6,
    a connection made straight to the daemon's port at any of its own addresses (127.0.0.1
    too when listening on 0.0.0.0), from the host or from a neighbour, is reset at once
    by the loop guard; the upstream sees no connection, and the counters show each one
    refused and nothing relayed (no chain of relays)."""
    value, from_client, from_gateway, redirected = LISTENS[listen]
    daemon = start_own_daemon(f"metaproxy-guard-{listen}", _config(value))
    mark = daemon.mark()
    for address in from_client:
        _direct(world.client, address, daemon.port, daemon)
    for address in from_gateway:
        _direct(world.lab.gateway, address, daemon.port, daemon)
    tried = len(from_client) + len(from_gateway)

    got = counters(daemon)
    log = daemon.log_since(mark)
    guard = [line for line in log.splitlines() if " refused: " in line and "loop guard" in line]
    other = [line for line in log.splitlines() if " refused: " in line and "loop guard" not in line]
    assert len(guard) == tried and not other, \
        f"expected {tried} loop-guard refusals and no other refusal:\n{log}"
    assert (got.open, got.total, got.refused, got.failed) == (0, tried, tried, 0), got
    assert counting.settle(quiet=0.5) == 0 and counting.connects() == 0, \
        f"the upstream was reached:\n{counting.process.output()}"

    if redirected:
        # The control: a redirected connection through the same daemon and route
        # does reach the upstream, so the zero above is the guard's doing.
        for web in (WEB4, WEB6):
            sock = world.client.connect(web, 8001)
            try:
                sock.sendall(b"x")
                for _ in range(100):
                    if counting.connects() >= (1 if web == WEB4 else 2):
                        break
                    time.sleep(0.05)
            finally:
                sock.close()
        assert counting.connects() == 2, f"the control did not reach the upstream:\n" \
                                         f"{counting.process.output()}\ndaemon:\n{daemon.log_since(mark)}"
    assert daemon.alive()
