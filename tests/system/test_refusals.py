"""Connections the daemon cannot or must not relay fail fast, with a reset.

"Reset" means the client's read fails with ECONNRESET: the daemon closed
with SO_LINGER 0, so the application fails at once instead of hanging.
"""

from __future__ import annotations

import pytest

from tests.system import clients
from tests.system.daemon import Daemon
from tests.system.lab import WEB4, WEB6
from tests.system.peers import World
from tests.system.topology import (DOWN_PORT, HTTP_BAD_AUTH_PORT, SILENT_UPSTREAM_DEST_PORT,
                                   SOCKS_BAD_AUTH_PORT, UNMATCHED_PORT, UPSTREAMS)

WEB = {"ipv4": WEB4, "ipv6": WEB6}
REQUEST = b"GET / HTTP/1.0\r\n\r\n"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_unmatched_port_is_reset_within_a_second(world: World, relay: Daemon, family: str) -> None:
    """A destination port that no route matches (and no "*" route) is refused with a reset."""
    outcome = clients.exchange(world.client, WEB[family], UNMATCHED_PORT, REQUEST)
    assert outcome.reset, f"expected a reset, got {outcome}\ndaemon:\n{relay.log()[-2000:]}"
    assert outcome.seconds < 1.0, outcome


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_unmatched_port_fails_curl_fast(world: World, relay: Daemon, family: str) -> None:
    """An unmodified curl to an unrouted port fails at once (connection reset), not after a timeout.

    Depending on when the reset lands, curl reports it while connecting (7),
    while sending (55), as an empty reply (52) or as a receive failure (56)."""
    got = clients.curl(world.client, clients.url(WEB[family], UNMATCHED_PORT), timeout=10)
    assert got.code in (7, 52, 55, 56), f"curl exit {got.code}: {got.stderr}"
    assert got.seconds < 1.0, got


@pytest.mark.parametrize("listener", ["127.0.0.1", "::1"])
def test_direct_connection_to_listener_is_refused_by_loop_guard(world: World, relay: Daemon,
                                                                listener: str) -> None:
    """Connecting straight to the daemon's own listener was never redirected:
    relaying it would loop, so it is reset."""
    mark = relay.mark()
    outcome = clients.exchange(world.client, listener, relay.port, REQUEST)
    assert outcome.reset, f"expected a reset, got {outcome}\ndaemon:\n{relay.log_since(mark)}"
    assert outcome.seconds < 1.0, outcome
    assert relay.alive()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_upstream_down_resets_client_within_a_second(world: World, relay: Daemon, family: str) -> None:
    """When nothing listens at the upstream's address, the client is reset within a second."""
    outcome = clients.exchange(world.client, WEB[family], DOWN_PORT, REQUEST)
    assert outcome.reset, f"expected a reset, got {outcome}\ndaemon:\n{relay.log()[-2000:]}"
    assert outcome.seconds < 1.0, outcome


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_silent_upstream_hits_connect_timeout_and_client_is_reset(world: World, relay: Daemon,
                                                                  family: str) -> None:
    """An upstream that accepts and never answers the handshake: after the upstream's
    connect_timeout (1 s) the client is reset."""
    outcome = clients.exchange(world.client, WEB[family], SILENT_UPSTREAM_DEST_PORT, REQUEST, timeout=10)
    assert outcome.reset, f"expected a reset, got {outcome}\ndaemon:\n{relay.log()[-2000:]}"
    assert 0.8 <= outcome.seconds < 3.0, outcome


@pytest.mark.parametrize("upstream,port,reason", [("http_bad_auth", HTTP_BAD_AUTH_PORT, "401"),
                                                   ("socks_bad_auth", SOCKS_BAD_AUTH_PORT, "auth")])
def test_upstream_rejecting_credentials_resets_client_and_says_why(world: World, relay: Daemon, upstream: str,
                                                                   port: int, reason: str) -> None:
    """Wrong credentials (tinyproxy answers 401 to a bad BasicAuth, microsocks refuses the RFC 1929 login):
    the client is reset at once and the daemon's log says what the upstream answered."""
    mark = relay.mark()
    outcome = clients.exchange(world.client, WEB4, port, REQUEST)
    assert outcome.reset and outcome.seconds < 1.0, outcome
    log = relay.wait_log(f"upstream {upstream}", since=mark)
    refusals = [line for line in log.splitlines() if f"upstream {upstream}" in line]
    assert refusals and reason in refusals[0].lower(), f"expected {reason!r} in the refusal:\n{log}"


def test_one_failing_connection_leaves_the_others_working(world: World, relay: Daemon) -> None:
    """While a connection waits on a silent upstream, others are relayed normally."""
    import threading
    results: list[clients.Outcome] = []
    waiter = threading.Thread(target=lambda: results.append(
        clients.exchange(world.client, WEB4, SILENT_UPSTREAM_DEST_PORT, REQUEST, timeout=10)))
    waiter.start()
    try:
        got = clients.curl(world.client, clients.url(WEB4, UPSTREAMS["dante"][0]))
        assert got.ok, got.stderr
    finally:
        waiter.join(15)
    assert results and results[0].reset
