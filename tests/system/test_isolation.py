"""Tor stream isolation through generated SOCKS5 credentials (issue 2, item 8).

The upstream is dante with "socksmethod: pam.username none" and pam_permit:
like Tor, it accepts any username and password, or none, and its own log
names the username of every connection it relays. The shared daemon routes
one destination port per isolation mode to it (topology.UPSTREAMS, iso_*).
Whatever the daemon generated, dante's log is the witness.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.system import clients
from tests.system.daemon import Daemon
from tests.system.lab import CLIENT4, CLIENT6, WEB4, WEB6
from tests.system.peers import World
from tests.system.topology import ISO_DESTINATION_OTHER_PORT, UPSTREAMS

# dante logs an opened session as:
#   pass(1): tcp/connect [: pam.username%NAME@192.0.2.1.PORT 192.0.2.2.1081 -> 198.51.100.1.PORT 198.51.100.2.8021
# and without the "pam.username%NAME@" part when no authentication took place.
_SESSION = re.compile(r"tcp/connect \[: (?:pam\.username%(?P<user>.*?)@)?"
                      rf"(?:{re.escape(CLIENT4)}|{re.escape(CLIENT6)})\.\d+ \S+ -> \S+ (?P<dest>\S+)\s*$")
NO_AUTH = None


def _sessions(log: Path, mark: int, dest_port: int, count: int, timeout: float = 5) -> list[str | None]:
    """The usernames (None: no auth) of dante's sessions to dest_port logged after mark.

    Waits (bounded) until `count` sessions are there: dante writes the line
    when it has connected, which may trail the client's exit slightly."""
    found: list[str | None] = []
    for _ in range(int(timeout / 0.05) + 1):
        text = log.read_text(errors="replace")[mark:]
        found = [m.group("user") for m in map(_SESSION.search, text.splitlines())
                 if m and m.group("dest").endswith(f".{dest_port}")]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"dante logged {len(found)} of {count} sessions to port {dest_port}:\n"
                         f"{log.read_text(errors='replace')[mark:]}")


def _mark(log: Path) -> int:
    return len(log.read_text(errors="replace"))


def _fetch(world: World, address: str, port: int, *, as_nobody: bool = False) -> None:
    got = clients.curl(world.client, clients.url(address, port), as_nobody=as_nobody)
    assert got.ok, f"curl {address}:{port} (nobody={as_nobody}) failed: {got.stderr}"


def _check_generated(names: list[str | None]) -> None:
    for name in names:
        assert name, f"expected a generated username, found none in {names}"
        assert not name.startswith("<torS0X>"), f"generated username {name!r} starts with <torS0X>"


def test_isolation_connection_gives_every_connection_its_own_username(world: World, relay: Daemon) -> None:
    """isolation = connection: two connections to the same destination carry different usernames."""
    log, port = world.gateway.dante_auth_log, UPSTREAMS["iso_connection"][0]
    mark = _mark(log)
    for _ in range(3):
        _fetch(world, WEB4, port)
    names = _sessions(log, mark, port, 3)
    _check_generated(names)
    assert len(set(names)) == 3, f"expected 3 distinct usernames, dante saw {names}"


def test_isolation_destination_shares_a_username_per_destination(world: World, relay: Daemon) -> None:
    """isolation = destination: the same address and port share a username; another port
    or another address gets another one."""
    log, port = world.gateway.dante_auth_log, UPSTREAMS["iso_destination"][0]
    other = ISO_DESTINATION_OTHER_PORT
    mark = _mark(log)
    _fetch(world, WEB4, port)
    _fetch(world, WEB4, port)
    same = _sessions(log, mark, port, 2)
    _check_generated(same)
    assert same[0] == same[1], f"same destination, different usernames: {same}"
    mark = _mark(log)
    _fetch(world, WEB4, other)
    other_port = _sessions(log, mark, other, 1)
    mark = _mark(log)
    _fetch(world, WEB6, port)
    other_address = _sessions(log, mark, port, 1)
    _check_generated(other_port + other_address)
    assert len({same[0], other_port[0], other_address[0]}) == 3, \
        f"expected one username per destination: {same[0]}, {other_port[0]}, {other_address[0]}"


def test_isolation_user_shares_a_username_per_local_uid(world: World, relay: Daemon) -> None:
    """isolation = user: two connections from root share a username (even to different
    destinations); a connection from nobody gets a different one."""
    log, port = world.gateway.dante_auth_log, UPSTREAMS["iso_user"][0]
    mark = _mark(log)
    _fetch(world, WEB4, port)
    _fetch(world, WEB6, port)
    root = _sessions(log, mark, port, 2)
    mark = _mark(log)
    _fetch(world, WEB4, port, as_nobody=True)
    _fetch(world, WEB4, port, as_nobody=True)
    nobody = _sessions(log, mark, port, 2)
    _check_generated(root + nobody)
    assert root[0] == root[1], f"two connections from uid 0, different usernames: {root}"
    assert nobody[0] == nobody[1], f"two connections from nobody, different usernames: {nobody}"
    assert root[0] != nobody[0], f"uid 0 and nobody share the username {root[0]!r}"


def test_isolation_none_sends_no_credentials(world: World, relay: Daemon) -> None:
    """isolation = none: no credentials are generated, so every connection looks
    the same to the upstream (no username at all)."""
    log, port = world.gateway.dante_auth_log, UPSTREAMS["iso_none"][0]
    mark = _mark(log)
    _fetch(world, WEB4, port)
    _fetch(world, WEB6, port)
    _fetch(world, WEB4, port, as_nobody=True)
    names = _sessions(log, mark, port, 3)
    assert names == [NO_AUTH] * 3, f"expected no username on any connection, dante saw {names}"


def test_configured_username_overrides_isolation(world: World, relay: Daemon) -> None:
    """With a username set, isolation is ignored: every connection uses that username."""
    log, port = world.gateway.dante_auth_log, UPSTREAMS["iso_fixed"][0]
    mark = _mark(log)
    _fetch(world, WEB4, port)
    _fetch(world, WEB4, port, as_nobody=True)
    names = _sessions(log, mark, port, 2)
    assert names == ["fixeduser", "fixeduser"], f"dante saw {names}"
