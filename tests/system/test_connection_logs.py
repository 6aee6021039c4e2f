"""No traffic record at the default level; per-connection lines only on request;
refusal lines rate-limited.

- Default: a relayed connection writes no line of its own (no "open via", no
  "close ("): when connections happen and how many bytes they move is
  traffic-analysis material. The counters (SIGUSR1) still count it.
- ``log_connections = yes``: the open and close lines appear, destination
  ``[scrubbed]``; with -d as well, they name the destination. -d alone shows
  destinations but adds no per-connection line.
- Refusals: at most 10 lines per 60 s window (log_refusals' default); the rest are counted and
  reported in one line when the window ends (or at stop). The window is too
  long for a test, so a burst of 50 must give exactly 10 lines now, 50 in the
  counters, and "40 more refusals" once the daemon stops.

Routes are ranges (topology.privacy_config), so a destination port found in a
log line is a leak.
"""

from __future__ import annotations

import re

import pytest

from tests.system import clients
from tests.system.counting import counters
from tests.system.daemon import Daemon, StartDaemon
from tests.system.lab import WEB4, WEB6
from tests.system.peers import INDEX, World
from tests.system.topology import PRIVATE_HTTP_PORT, PRIVATE_UNMATCHED_PORT, privacy_config

LEAK = re.compile(rf"198\.51\.100\.\d+|2001:0?db8:0?0?0?2:|(?<!\d){PRIVATE_HTTP_PORT}(?!\d)", re.IGNORECASE)
BURST = 50
SHOWN = 10


def with_connections(port: int) -> str:
    return privacy_config(port).replace("[upstreams]", "log_connections = yes\n[upstreams]", 1)


def _default_refusal_limit(text: str) -> str:
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("log_refusals")]
    if len(kept) != len(lines) - 1:
        raise AssertionError(f"expected one log_refusals line from daemon_section:\n{text}")
    return "".join(kept)


def _relay_two(world: World, daemon: Daemon) -> None:
    """One fetch over IPv4 and one over IPv6; both relayed and closed."""
    for address in (WEB4, WEB6):
        got = clients.curl(world.client, clients.url(address, PRIVATE_HTTP_PORT))
        assert got.ok and got.body == INDEX.encode(), f"{got.stderr}\ndaemon:\n{daemon.log()}"


def _lines(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


@pytest.mark.parametrize("args", [(), ("-d",)], ids=["default", "debug-only"])
def test_relayed_connections_write_no_line_of_their_own(world: World, start_own_daemon: StartDaemon,
                                                        args: tuple[str, ...]) -> None:
    """Without log_connections (with or without -d), two relayed connections leave no
    "open via" or "close (" line and no line with a connection id, while SIGUSR1's
    counters do count them and their bytes."""
    daemon = start_own_daemon("metaproxy-quiet", privacy_config, args=args)
    _relay_two(world, daemon)
    got = counters(daemon)
    for _ in range(50):  # the closes may still be on their way
        if got.open == 0:
            break
        got = counters(daemon)
    assert (got.open, got.total, got.refused, got.failed) == (0, 2, 0, 0), got
    assert got.bytes_down > len(INDEX) and got.bytes_up > 0, got
    daemon.stop()
    log = daemon.log()
    assert "stopped:" in log, log
    per_connection = _lines(log, " open via ") + _lines(log, " close (") + _lines(log, "cid=")
    assert not per_connection, "per-connection lines without log_connections:\n" + "\n".join(per_connection)


def test_log_connections_writes_scrubbed_open_and_close_lines(world: World,
                                                             start_own_daemon: StartDaemon) -> None:
    """With log_connections = yes, each relayed connection has one open and one close
    line, with its id and upstream, and the destination only as [scrubbed]."""
    daemon = start_own_daemon("metaproxy-connlog", with_connections)
    _relay_two(world, daemon)
    for _ in range(50):
        if len(_lines(daemon.log(), " close (")) >= 2:
            break
        daemon.wait_log("close (", daemon.mark(), timeout=0.1)
    daemon.stop()
    log = daemon.log()
    opened, closed = _lines(log, " open via dante"), _lines(log, " close (")
    assert len(opened) == 2 and len(closed) == 2, log
    assert all("[scrubbed]" in line and "cid=" in line for line in opened + closed), log
    assert all(" bytes up, " in line for line in closed), closed
    leaks = [line for line in log.splitlines() if LEAK.search(line)]
    assert not leaks, "destinations in log_connections lines:\n" + "\n".join(leaks)


def test_log_connections_with_debug_names_the_destinations(world: World,
                                                          start_own_daemon: StartDaemon) -> None:
    """With log_connections = yes and -d, the open and close lines name the destination."""
    daemon = start_own_daemon("metaproxy-connlog-d", with_connections, args=("-d",))
    _relay_two(world, daemon)
    for _ in range(50):
        if len(_lines(daemon.log(), " close (")) >= 2:
            break
        daemon.wait_log("close (", daemon.mark(), timeout=0.1)
    daemon.stop()
    log = daemon.log()
    opened, closed = _lines(log, " open via dante"), _lines(log, " close (")
    assert len(opened) == 2 and len(closed) == 2, log
    for lines in (opened, closed):
        assert any(WEB4 in line for line in lines) and any(WEB6 in line for line in lines), lines
        assert all(str(PRIVATE_HTTP_PORT) in line and "[scrubbed]" not in line for line in lines), lines


def test_a_burst_of_refusals_writes_ten_lines_and_counts_them_all(world: World,
                                                                 start_own_daemon: StartDaemon) -> None:
    """50 connections to a port without a route, within a second or so: each is reset,
    exactly 10 refusal lines are written, SIGUSR1 counts 50 refused, and at stop one
    line says the other 40 were not logged."""
    # daemon_section lifts the limit for the other tests; this one runs with the default.
    daemon = start_own_daemon("metaproxy-burst", lambda port: _default_refusal_limit(privacy_config(port)))
    mark = daemon.mark()
    for i in range(BURST):
        outcome = clients.exchange(world.client, WEB4, PRIVATE_UNMATCHED_PORT, b"x", timeout=5)
        assert outcome.reset, f"connection {i}: {outcome}"
    got = counters(daemon)
    assert (got.open, got.total, got.refused) == (0, BURST, BURST), got
    log = daemon.log_since(mark)
    refusals = _lines(log, " refused: ")
    assert len(refusals) == SHOWN, f"{len(refusals)} refusal lines for {BURST} refusals:\n{log}"
    assert "more refusals" not in log, log  # the window has not ended yet
    daemon.stop()
    log = daemon.log_since(mark)
    assert len(_lines(log, " refused: ")) == SHOWN, log
    summary = _lines(log, "more refusals")
    assert len(summary) == 1 and f"{BURST - SHOWN} more refusals in the last 60s were not logged" in summary[0], log
