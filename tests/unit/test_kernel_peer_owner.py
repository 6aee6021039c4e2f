"""client_uid() against the real kernel: the owner of one live socket, or None.

The client runs in a forked child as uid 65534 (nobody), and the lookup runs
in another forked child as uid 65533, as the daemon runs it: unprivileged.
Over IPv4, IPv6, a v4-mapped peer of a dual-stack listener, and a client whose
own socket is AF_INET6 connected to a v4-mapped address. Root only (setresuid).

At the bottom, a real iptables REDIRECT in a network namespace the test
creates and removes: a client reusing its source port while conntrack
remembers the previous connection is given another port by NAT, the exact
lookup misses, and the fallback finds the owner, unless two users share the
address and destination.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from metaproxy.config.model import Isolation
from metaproxy.kernel import peer_owner
from metaproxy.kernel.peer_owner import client_uid
from metaproxy.protocol import inet_diag
from metaproxy.protocol.isolation import Isolator
from tests.unit.forked import in_child, require_root

CLIENT_UID, LOOKUP_UID = 65534, 65533
WAIT = 10.0  # every wait below is bounded by this


@contextlib.contextmanager
def _client(uid: int, family: int, address: tuple[str, int], linger0: bool = False,
            bind: tuple[str, int] | None = None) -> Iterator[Callable[[], None]]:
    """A child that connects as ``uid`` (from ``bind``, with SO_REUSEADDR, if given) and stays
    connected until hang_up() is called or the block ends; it then closes (with a reset if
    linger0) and exits. Yields hang_up."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(ready_r)
            os.close(hold_w)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(WAIT)
            if bind is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(bind)
            sock.connect(address)
            os.write(ready_w, b"c")
            select.select([hold_r], [], [], WAIT)
            if linger0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(hold_r)
    done: list[bool] = []

    def hang_up() -> None:
        """Let the child close its socket, and wait (bounded) until it has exited."""
        if done:
            return
        done.append(True)
        os.close(hold_w)
        deadline = time.monotonic() + WAIT
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the client child did not exit within {WAIT}s")
            time.sleep(0.005)

    try:
        if not select.select([ready_r], [], [], WAIT)[0] or os.read(ready_r, 1) != b"c":
            pytest.fail(f"the client child did not connect to {address} within {WAIT}s")
        yield hang_up
    finally:
        hang_up()
        os.close(ready_r)


def _lookup_unprivileged(family: int, peer: tuple[str, int], dest: tuple[str, int]) -> int | None:
    def body() -> int | None:
        os.setgroups([])
        os.setresgid(LOOKUP_UID, LOOKUP_UID, LOOKUP_UID)
        os.setresuid(LOOKUP_UID, LOOKUP_UID, LOOKUP_UID)
        return client_uid(peer, dest)
    outcome = in_child(body, timeout=WAIT)
    assert outcome.signal is None and not outcome.error, outcome
    return outcome.value


Accepted = tuple[socket.socket, tuple[str, int], tuple[str, int], Callable[[], None]]
# (listener address, dual-stack?, client family, the address the client connects to)
CASES = {
    "ipv4": ("127.0.0.1", False, socket.AF_INET, "127.0.0.1"),
    "ipv6": ("::1", False, socket.AF_INET6, "::1"),
    "v4-mapped peer of a dual-stack listener": ("::", True, socket.AF_INET, "127.0.0.1"),
    "client socket AF_INET6 to a v4-mapped address": ("::", True, socket.AF_INET6, "::ffff:127.0.0.1"),
}


@contextlib.contextmanager
def _accepted(case: str, linger0: bool = False) -> Iterator[Accepted]:
    """(our accepted socket, the peer as accept() gave it, the client's remote end, hang_up),
    while our accepted socket stays open."""
    require_root()
    host, dual, family, target = CASES[case]
    server_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=server_family, dualstack_ipv6=dual) as server:
        server.settimeout(WAIT)
        port = server.getsockname()[1]
        with _client(CLIENT_UID, family, (target, port), linger0) as hang_up:
            accepted, peer = server.accept()
            with accepted:
                yield accepted, (peer[0], peer[1]), (target, port), hang_up


@pytest.mark.parametrize("case", CASES)
def test_finds_the_non_root_owner_of_a_live_socket(case: str) -> None:
    """The client's socket (peer -> the address it connected to) is owned by uid 65534,
    and an unprivileged lookup says so, whatever the address form."""
    with _accepted(case) as (accepted, peer, dest, _):
        assert _lookup_unprivileged(accepted.family, peer, dest) == CLIENT_UID
        # The dest in both spellings: as getsockopt(SO_ORIGINAL_DST) gives it for IPv4.
        plain_dest = (dest[0].removeprefix("::ffff:"), dest[1])
        assert client_uid(peer, plain_dest) == CLIENT_UID


@pytest.mark.parametrize("case", CASES)
def test_no_owner_for_another_destination_or_address(case: str) -> None:
    """Another destination port, or another peer address: no such socket, so None, not a
    neighbour's uid."""
    with _accepted(case) as (accepted, peer, dest, _):
        assert client_uid(peer, (dest[0], 1)) is None
        assert client_uid((peer[0], 1), (dest[0], 1)) is None
        other = "127.0.0.2" if "." in peer[0] else "::2"
        assert client_uid((other, peer[1]), dest) is None


@pytest.mark.parametrize("case", CASES)
def test_another_source_port_finds_the_one_socket_from_that_address(case: str) -> None:
    """The fallback: no socket has that source port, but exactly one live socket goes from
    the peer's address to the destination, so its owner is the answer (as when NAT changed
    the port; the REDIRECT test below does it for real)."""
    with _accepted(case) as (accepted, peer, dest, _):
        assert _lookup_unprivileged(accepted.family, (peer[0], 1), dest) == CLIENT_UID


@pytest.mark.parametrize("linger0", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize("case", CASES)
def test_a_client_that_has_gone_has_no_owner(case: str, linger0: bool) -> None:
    """The client closes while our accepted socket is still open, as when the daemon is slow
    to look it up. Closed (FIN_WAIT2, which /proc/net/tcp lists with uid 0) or reset (no
    entry): the lookup answers None, never 0."""
    with _accepted(case, linger0) as (accepted, peer, dest, hang_up):
        hang_up()
        assert client_uid(peer, dest) is None
        assert _lookup_unprivileged(accepted.family, peer, dest) is None


def test_a_root_client_is_root() -> None:
    """A live socket opened by root is root's: uid 0 is returned only for an ESTABLISHED entry."""
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        accepted, peer = server.accept()
        with accepted:
            assert client_uid(peer, server.getsockname()) == os.geteuid()
        del client


def test_malformed_addresses_have_no_owner() -> None:
    assert client_uid(("not an address", 1), ("127.0.0.1", 2)) is None
    assert client_uid(("::1", 1), ("127.0.0.1", 2)) is None


# -- a real REDIRECT that changes the source port ------------------------------

CLIENT_ADDRESS, ORIGINAL = "192.0.2.1", "198.51.100.2"
REUSED_PORT, LISTEN_PORT = 40000, 8675
OTHER_UID = 4242
CLONE_NEWNET = 0x40000000



def test_one_socket_serves_exact_lookups_and_goes_after_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sock_diag socket is kept while each lookup reads exactly its one answer; after a
    dump (which may leave datagrams unread) or a reply that is not ours it is closed, and a
    forked child (the namespace tests) never asks through its parent's."""
    with _accepted("ipv4") as (accepted, peer, dest, _):
        assert client_uid(peer, dest) == CLIENT_UID
        kept = peer_owner._kept
        assert kept is not None and client_uid(peer, dest) == CLIENT_UID and peer_owner._kept is kept
        child = in_child(lambda: peer_owner._kept is None)
        assert child.ok and child.value is True, child
        assert client_uid(peer, (dest[0], 1)) is None  # no such socket: the exact miss, then a dump
        assert peer_owner._kept is None and kept.fileno() == -1
        assert client_uid(peer, dest) == CLIENT_UID and peer_owner._kept is not None

        def foreign(data: bytes, seq: int) -> inet_diag.Entry | None:
            raise inet_diag.DiagError(f"netlink reply to request {seq + 7}, expected {seq}")
        monkeypatch.setattr(inet_diag, "parse_reply", foreign)
        assert client_uid(peer, dest) is None and peer_owner._kept is None
        monkeypatch.undo()
        assert client_uid(peer, dest) == CLIENT_UID


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=WAIT)


@contextlib.contextmanager
def _redirect_namespace() -> Iterator[str]:
    """A namespace with both documentation addresses on lo and an iptables REDIRECT of every
    TCP connection to ORIGINAL towards port LISTEN_PORT; removed at the end, even on failure.
    Its only processes are the forked children, each ended by PID within WAIT."""
    require_root()
    name = f"mp-peerowner-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        for address in (CLIENT_ADDRESS, ORIGINAL):
            _ip("-n", name, "address", "add", f"{address}/32", "dev", "lo")
        subprocess.run(["ip", "netns", "exec", name, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
                        "-d", ORIGINAL, "-j", "REDIRECT", "--to-ports", str(LISTEN_PORT)],
                       check=True, capture_output=True, timeout=WAIT)
        yield name
    finally:
        _ip("netns", "delete", name)


def _enter(name: str) -> None:
    """setns() into the namespace; only ever called in a forked child."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


def _exact_only(peer: tuple[str, int], dest: tuple[str, int]) -> int | None:
    """The lookup as it was before the fallback: the exact 4-tuple alone."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, inet_diag.NETLINK_SOCK_DIAG) as nl:
        nl.send(inet_diag.exact_request(peer, dest, 1))
        return inet_diag.established_owner(inet_diag.parse_reply(nl.recv(inet_diag.REPLY_BUFFER), 1), peer, dest)


def _redirected(listener: socket.socket, uid: int, port: int, stack: contextlib.ExitStack,
                bind: tuple[str, int] = (CLIENT_ADDRESS, REUSED_PORT)) -> tuple[socket.socket, tuple[str, int]]:
    """A client of ``uid`` connected (through the REDIRECT) to ORIGINAL:port and held open by
    ``stack``; returns our accepted socket and its peer as accept() gave it."""
    stack.enter_context(_client(uid, socket.AF_INET, (ORIGINAL, port), bind=bind))
    accepted, peer = listener.accept()
    stack.enter_context(accepted)
    return accepted, (peer[0], peer[1])


def _reused_port_connection(listener: socket.socket, uid: int, stack: contextlib.ExitStack,
                            first: int, second: int) -> tuple[str, int]:
    """A connection from REUSED_PORT to ORIGINAL:first, closed (ours first), then one from
    the same port to ORIGINAL:second, held open. Returns the second one's peer as we see it."""
    with contextlib.ExitStack() as earlier:
        accepted, peer = _redirected(listener, uid, first, earlier)
        if peer != (CLIENT_ADDRESS, REUSED_PORT):
            raise AssertionError(f"the first connection already came from {peer}")
        accepted.close()
    return _redirected(listener, uid, second, stack)[1]


def test_redirect_that_changed_the_source_port_still_finds_the_owner() -> None:
    """The bug: conntrack remembers REUSED_PORT's previous connection, so NAT gives the next
    one another source port. The exact lookup misses; the fallback finds uid 65534, also when
    run unprivileged."""
    with _redirect_namespace() as name:
        def body() -> dict[str, object]:
            _enter(name)
            with socket.create_server(("127.0.0.1", LISTEN_PORT)) as listener, contextlib.ExitStack() as stack:
                listener.settimeout(WAIT)
                peer = _reused_port_connection(listener, CLIENT_UID, stack, 8101, 8102)
                dest = (ORIGINAL, 8102)
                found: dict[str, object] = {"peer port": peer[1], "exact": _exact_only(peer, dest),
                                            "fallback": client_uid(peer, dest),
                                            "unprivileged": _lookup_unprivileged(socket.AF_INET, peer, dest)}
            return found  # after the ExitStack, which mypy counts as able to swallow exceptions
        outcome = in_child(body, timeout=4 * WAIT)
    assert outcome.ok, outcome
    assert outcome.value["peer port"] != REUSED_PORT, f"NAT kept the port: {outcome.value}"
    assert outcome.value["exact"] is None, outcome.value
    assert outcome.value["fallback"] == outcome.value["unprivileged"] == CLIENT_UID, outcome.value


def test_two_users_behind_the_same_address_and_destination_are_unknown() -> None:
    """uid 65534's connection had its port changed by NAT while uid 4242 has a live
    connection from the same address to the same destination: either could be ours, so
    None (a fresh credential), never one of theirs. uid 4242's own connection, whose port
    NAT kept, is still found exactly."""
    with _redirect_namespace() as name:
        def body() -> dict[str, object]:
            _enter(name)
            with socket.create_server(("127.0.0.1", LISTEN_PORT)) as listener, contextlib.ExitStack() as stack:
                listener.settimeout(WAIT)
                peer = _reused_port_connection(listener, CLIENT_UID, stack, 8101, 8102)
                other = _redirected(listener, OTHER_UID, 8102, stack, bind=(CLIENT_ADDRESS, 0))[1]
                dest = (ORIGINAL, 8102)
                found: dict[str, object] = {"peer port": peer[1], "changed": client_uid(peer, dest),
                                            "other": client_uid(other, dest)}
            return found
        outcome = in_child(body, timeout=4 * WAIT)
    assert outcome.ok, outcome
    assert outcome.value["peer port"] != REUSED_PORT, f"NAT kept the port: {outcome.value}"
    assert outcome.value["changed"] is None and outcome.value["other"] == OTHER_UID, outcome.value


ROUNDS = 6  # connections per user, each from its user's one reused port


def test_two_users_with_forced_port_collisions_get_exactly_two_usernames() -> None:
    """The figure of the bug report: two users, each reusing one source port for every
    connection while alternating two destination ports, so NAT changes the port of every
    connection after the first. isolation = user gives exactly two usernames; the exact
    lookup alone gave one per changed connection."""
    with _redirect_namespace() as name:
        def body() -> dict[str, int]:
            _enter(name)
            isolator = Isolator(Isolation.USER)
            before: set[str] = set()
            after: set[str] = set()
            with socket.create_server(("127.0.0.1", LISTEN_PORT)) as listener:
                listener.settimeout(WAIT)
                for n in range(ROUNDS):
                    for uid, port in ((CLIENT_UID, REUSED_PORT), (OTHER_UID, REUSED_PORT + 1)):
                        with contextlib.ExitStack() as stack:
                            dest = (ORIGINAL, 8101 + n % 2)
                            peer = _redirected(listener, uid, dest[1], stack, bind=(CLIENT_ADDRESS, port))[1]
                            for names, found in ((before, _exact_only(peer, dest)),
                                                 (after, client_uid(peer, dest))):
                                credentials = isolator.credentials(dest[0], dest[1], found)
                                assert credentials is not None
                                names.add(credentials[0])
            return {"before": len(before), "after": len(after)}
        outcome = in_child(body, timeout=8 * WAIT)
    assert outcome.ok, outcome
    assert outcome.value["after"] == 2, outcome.value
    assert outcome.value["before"] > 2, outcome.value
