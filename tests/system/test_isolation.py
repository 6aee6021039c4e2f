"""Tor stream isolation through generated SOCKS5 credentials, per isolation mode.

The upstream is dante with "socksmethod: pam.username none" and pam_permit:
like Tor, it accepts any username and password, or none, and its own log
names the username of every connection it relays. The shared daemon routes
one destination port per isolation mode to it (topology.UPSTREAMS, iso_*).
Whatever the daemon generated, dante's log is the witness.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.system import clients
from tests.system.daemon import Daemon
from tests.system.lab import CLIENT4, CLIENT6, WEB4, WEB6, clean_env
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


# A client gone before its owner is looked up (the uid-0 race). Run in the client namespace as a given uid:
#   burst N    N concurrent HTTP/1.0 fetches that stay connected until the reply;
#              prints how many got "HTTP/1.1 200"
#   closers N  N connections closed at once after connect(), 10 ms apart; prints N
# Both bounded in time (every socket has a timeout, the whole burst a deadline).
_LOAD = r"""
import asyncio, socket, sys, time
mode, count, host, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
request = f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()
async def fetch():
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        head = await reader.readline()
        await reader.read()
        writer.close()
        return head.startswith(b"HTTP/1.1 200")
    except OSError:
        return False
async def burst():
    done = await asyncio.wait_for(asyncio.gather(*(fetch() for _ in range(count))), 60)
    return sum(done)
if mode == "burst":
    print(asyncio.run(burst()))
else:
    for _ in range(count):
        s = socket.create_connection((host, port), timeout=5)
        s.close()
        time.sleep(0.01)
    print(count)
"""
BURST, CLOSERS = 300, 25
BURST_UID, CLOSER_UID = 4242, 65534  # another user, and nobody


def _load_argv(world: World, uid: int, mode: str, count: int, port: int) -> list[str]:
    return world.client.argv(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                              sys.executable, "-c", _LOAD, mode, str(count), WEB4, str(port)])


def _run_load(world: World, uid: int, mode: str, count: int, port: int) -> int:
    done = subprocess.run(_load_argv(world, uid, mode, count, port), capture_output=True, timeout=90,
                          env=clean_env(HOME="/"), check=False)
    assert done.returncode == 0, f"{mode} as uid {uid} failed: {done.stderr.decode(errors='replace')}"
    return int(done.stdout)


def _settled_sessions(log: Path, mark: int, port: int, at_least: int, timeout: float = 20) -> list[str | None]:
    """At least `at_least` sessions, then no new one for a second (bounded by `timeout`)."""
    found = _sessions(log, mark, port, at_least, timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        again = _sessions(log, mark, port, 0)
        if len(again) == len(found):
            break
        found = again
    return found


def test_isolation_user_never_gives_a_gone_client_root_s_or_another_user_s_token(
        world: World, relay: Daemon) -> None:
    """The uid-0 race of a gone client: clients of nobody that close right after connecting,
    during a burst of 300 connections from uid 4242. A gone client's socket is listed
    with uid 0 (TIME_WAIT, orphaned FIN_WAIT2); the daemon must not read that as root.
    Burst connections carry uid 4242's username (or, where the owner is uncertain, a fresh
    one of their own), no other connection does, and no connection carries root's; a
    closer carries nobody's username or one of its own.
    (A daemon that refuses gone clients before connecting upstream sends fewer closer
    sessions to dante; the burst's count still catches any closer given uid 4242's name.)"""
    log, port = world.gateway.dante_auth_log, UPSTREAMS["iso_user"][0]
    mark = _mark(log)
    _fetch(world, WEB4, port)
    _fetch(world, WEB4, port, as_nobody=True)
    assert _run_load(world, BURST_UID, "burst", 1, port) == 1
    root, nobody, other = _sessions(log, mark, port, 3)
    _check_generated([root, nobody, other])
    assert len({root, nobody, other}) == 3, f"uid 0, nobody and uid {BURST_UID} share usernames: {root, nobody, other}"

    mark = _mark(log)
    burst = subprocess.Popen(_load_argv(world, BURST_UID, "burst", BURST, port), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=clean_env(HOME="/"))
    try:
        closed = _run_load(world, CLOSER_UID, "closers", CLOSERS, port)
        out, err = burst.communicate(timeout=90)
    finally:
        if burst.poll() is None:
            burst.kill()
            burst.wait(5)
    assert burst.returncode == 0, f"the burst failed: {err.decode(errors='replace')}"
    fetched = int(out)
    assert closed == CLOSERS and fetched >= BURST * 9 // 10, f"{fetched} of {BURST} burst fetches succeeded"

    names = _settled_sessions(log, mark, port, fetched)
    counts = collections.Counter(names)
    assert counts[root] == 0, f"{counts[root]} connections got root's username during the race"
    # uid 4242's name goes to burst connections only, and to nearly all of them. One whose
    # source port NAT changed, while a closer's socket from the same address to the same
    # destination still votes otherwise, has no certain owner: it gets a fresh name, one
    # of its own (isolate more, never less), which the uniqueness check below covers.
    assert counts[other] <= fetched, (
        f"{counts[other]} sessions carry uid {BURST_UID}'s username, but only {fetched} burst connections ran")
    assert counts[other] >= fetched * 9 // 10, (
        f"{fetched} burst connections succeeded but only {counts[other]} carry uid {BURST_UID}'s username")
    assert counts[nobody] <= CLOSERS, f"{counts[nobody]} sessions carry nobody's username, for {CLOSERS} closers"
    rest = [name for name in names if name not in (other, nobody)]
    _check_generated(rest)
    repeated = {name: n for name, n in collections.Counter(rest).items() if n > 1}
    assert not repeated, f"gone clients shared a username instead of one each: {repeated}"
    assert len(names) <= fetched + CLOSERS, f"{len(names)} sessions for {fetched} + {CLOSERS} connections"
