"""At the default level no log line names a destination; with -d they appear.

The daemon is driven through every outcome that could log a destination:
relayed (IPv4 and IPv6), upstream down, upstream handshake timeout, unmatched
port, and the loop guard. Its routes are ranges, so none of the destination
ports below is written literally in the config or printed from it.
"""

from __future__ import annotations

import re

import pytest

from tests.system import clients
from tests.system.daemon import Daemon, StartDaemon
from tests.system.lab import WEB4, WEB6
from tests.system.peers import World
from tests.system.topology import (PRIVATE_DOWN_PORT, PRIVATE_HTTP_PORT, PRIVATE_SILENT_PORT,
                                   PRIVATE_UNMATCHED_PORT, privacy_config)

REQUEST = b"GET / HTTP/1.0\r\n\r\n"
ADDRESSES = [r"198\.51\.100\.\d+", r"2001:db8:2:[0-9a-f:]*", r"2001:0?db8:0?0?0?2:"]
PORTS = [PRIVATE_HTTP_PORT, PRIVATE_DOWN_PORT, PRIVATE_SILENT_PORT, PRIVATE_UNMATCHED_PORT]
LEAK = re.compile("|".join(ADDRESSES + [rf"(?<!\d){p}(?!\d)" for p in PORTS]), re.IGNORECASE)


def _drive(world: World, daemon: Daemon) -> None:
    """Make one connection of every kind; wait until the daemon has logged them all."""
    for address in (WEB4, WEB6):
        got = clients.curl(world.client, clients.url(address, PRIVATE_HTTP_PORT))
        assert got.ok, f"{got.stderr}\ndaemon:\n{daemon.log()}"
        for port in (PRIVATE_DOWN_PORT, PRIVATE_SILENT_PORT, PRIVATE_UNMATCHED_PORT):
            outcome = clients.exchange(world.client, address, port, REQUEST, timeout=10)
            assert outcome.reset, f"{address}:{port}: {outcome}\ndaemon:\n{daemon.log()}"
    outcome = clients.exchange(world.client, "127.0.0.1", daemon.port, REQUEST)
    assert outcome.reset, outcome


def test_default_log_names_no_destination(world: World, start_own_daemon: StartDaemon) -> None:
    """Without -d, no line (not even an error) contains a destination address or port."""
    daemon = start_own_daemon("metaproxy-private", privacy_config)
    _drive(world, daemon)
    daemon.stop()  # flush whatever it logs at exit too
    log = daemon.log()
    assert log.strip(), "the daemon logged nothing at all: the test would prove nothing"
    leaks = [line for line in log.splitlines() if LEAK.search(line)]
    assert not leaks, "destinations in default-level log lines:\n" + "\n".join(leaks)
    # Refusals are still logged (scrubbed); relayed connections write no line of their own.
    assert "[scrubbed]" in log, f"expected scrubbed refusal lines:\n{log}"
    assert " open via " not in log and " close (" not in log, f"per-connection lines at the default level:\n{log}"


def _with_connections(port: int, *, debug_key: bool = False) -> str:
    return privacy_config(port, debug_key=debug_key).replace(
        "[upstreams]", "log_connections = yes\n[upstreams]", 1)


def test_connection_lines_name_no_destination(world: World, start_own_daemon: StartDaemon) -> None:
    """With log_connections = yes but without -d, the open and close lines are there
    and name no destination either."""
    daemon = start_own_daemon("metaproxy-private-conn", _with_connections)
    _drive(world, daemon)
    daemon.stop()
    log = daemon.log()
    assert " open via " in log and " close (" in log, f"expected per-connection lines:\n{log}"
    leaks = [line for line in log.splitlines() if LEAK.search(line)]
    assert not leaks, "destinations in log_connections lines:\n" + "\n".join(leaks)


@pytest.mark.parametrize("how", ["-d", "log_destinations"])
def test_debug_log_names_destinations_and_warns_once(world: World, start_own_daemon: StartDaemon,
                                                     how: str) -> None:
    """With -d (or log_destinations = yes) the destinations do appear (log_connections is
    on, so the relayed ones have lines too), and the daemon warns once, at start, that
    its logs now deanonymise the user."""
    if how == "-d":
        daemon = start_own_daemon("metaproxy-debug", _with_connections, args=("-d",))
    else:
        daemon = start_own_daemon("metaproxy-logdest", lambda port: _with_connections(port, debug_key=True))
    _drive(world, daemon)
    daemon.stop()
    log = daemon.log()
    assert log.count("deanonymise") == 1, log
    for needle in (WEB4, WEB6, str(PRIVATE_HTTP_PORT), str(PRIVATE_DOWN_PORT), str(PRIVATE_SILENT_PORT),
                   str(PRIVATE_UNMATCHED_PORT)):
        assert needle in log, f"{needle} missing from the debug log:\n{log}"
