"""client_uid() against the real kernel: the owner of one live socket, or None.

The client runs in a forked child as uid 65534 (nobody), and the lookup runs
in another forked child as uid 65533, as the daemon runs it: unprivileged.
Over IPv4, IPv6, a v4-mapped peer of a dual-stack listener, and a client whose
own socket is AF_INET6 connected to a v4-mapped address. Root only (setresuid).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from metaproxy.kernel.peer_owner import client_uid
from tests.unit.test_privileged_forking import in_child, require_root

CLIENT_UID, LOOKUP_UID = 65534, 65533
WAIT = 10.0  # every wait below is bounded by this


@contextlib.contextmanager
def _client(uid: int, family: int, address: tuple[str, int], linger0: bool = False) -> Iterator[Callable[[], None]]:
    """A child that connects as ``uid`` and stays connected until hang_up() is called or the
    block ends; it then closes (with a reset if linger0) and exits. Yields hang_up."""
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
        return client_uid(family, peer, dest)
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
        assert client_uid(accepted.family, peer, plain_dest) == CLIENT_UID


@pytest.mark.parametrize("case", CASES)
def test_no_owner_for_another_tuple(case: str) -> None:
    """Another destination port: no such socket, so None, not a neighbour's uid."""
    with _accepted(case) as (accepted, peer, dest, _):
        assert client_uid(accepted.family, peer, (dest[0], 1)) is None
        assert client_uid(accepted.family, (peer[0], 1), dest) is None


@pytest.mark.parametrize("linger0", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize("case", CASES)
def test_a_client_that_has_gone_has_no_owner(case: str, linger0: bool) -> None:
    """The client closes while our accepted socket is still open, as when the daemon is slow
    to look it up. Closed (FIN_WAIT2, which /proc/net/tcp lists with uid 0) or reset (no
    entry): the lookup answers None, never 0."""
    with _accepted(case, linger0) as (accepted, peer, dest, hang_up):
        hang_up()
        assert client_uid(accepted.family, peer, dest) is None
        assert _lookup_unprivileged(accepted.family, peer, dest) is None


def test_a_root_client_is_root() -> None:
    """A live socket opened by root is root's: uid 0 is returned only for an ESTABLISHED entry."""
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        accepted, peer = server.accept()
        with accepted:
            assert client_uid(socket.AF_INET, peer, server.getsockname()) == os.geteuid()
        del client


def test_malformed_addresses_have_no_owner() -> None:
    assert client_uid(socket.AF_INET, ("not an address", 1), ("127.0.0.1", 2)) is None
    assert client_uid(socket.AF_INET6, ("::1", 1), ("127.0.0.1", 2)) is None
