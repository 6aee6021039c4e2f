"""Relaying one connection (metaproxy.relay.pump) between real loopback TCP sockets.

A Relay joins two connected pairs, client <-> upstream, on a real Poller on a
real event loop, as the server does once a handshake is done. The pins follow
TCP: bytes pass both ways (splice through a pipe, or copied when the pool has
none), early payload goes first, EOF on one side becomes a half-close of the
other while the other direction keeps flowing, a reset on one side resets both,
and a closed relay has given back every pipe. The fuzz harness
(test_relay_server_fuzz.py) drives the same Relay through the whole server.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from metaproxy.relay.pipes import PipePool
from metaproxy.relay.poller import poller_for
from metaproxy.relay.pump import Relay


def _pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection, both non-blocking."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    for sock in (outer, inner):
        sock.setblocking(False)
    return outer, inner


@dataclass
class Lab:
    """app <-> [client | Relay | upstream] <-> peer"""

    loop: asyncio.AbstractEventLoop
    pool: PipePool
    app: socket.socket
    peer: socket.socket
    relay: Relay
    closed: list[str] = field(default_factory=list)

    async def read(self, sock: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = await asyncio.wait_for(self.loop.sock_recv(sock, size - len(data)), 5)
            if not chunk:
                break
            data += chunk
        return data

    async def until_closed(self) -> str:
        for _ in range(500):
            if self.closed:
                return self.closed[0]
            await asyncio.sleep(0.01)
        raise AssertionError("the relay never closed")


def run(body: Callable[[Lab], Awaitable[Any]], pool: PipePool | None = None, early: bytes = b"") -> Any:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        poller = poller_for(loop)
        app, client = _pair()
        upstream, peer = _pair()
        closed: list[str] = []
        relay = Relay(poller, client, upstream, pool or PipePool(),
                      lambda relay, reason: closed.append(reason))
        lab = Lab(loop, relay.pool, app, peer, relay, closed)
        relay.start(early)
        try:
            return await asyncio.wait_for(body(lab), 10)
        finally:
            relay.abort("test over")
            app.close()
            peer.close()
            poller.close()
            relay.pool.close()
    return asyncio.run(main())


@pytest.mark.parametrize("pipes", [256, 0], ids=["splice", "copy"])
def test_bytes_pass_both_ways_early_payload_first_and_are_counted(pipes: int) -> None:
    """What the upstream sent with its reply reaches the client before anything else;
    then every byte passes both ways, through pipes or, with none free, copied."""
    up, down = os.urandom(300_000), os.urandom(200_000)

    async def body(lab: Lab) -> None:
        assert await lab.read(lab.app, 6) == b"banner"
        sending = asyncio.gather(lab.loop.sock_sendall(lab.app, up), lab.loop.sock_sendall(lab.peer, down))
        got_up, got_down, _ = await asyncio.gather(lab.read(lab.peer, len(up)), lab.read(lab.app, len(down)),
                                                   sending)
        assert got_up == up and got_down == down
        assert lab.relay.bytes_up == len(up) and lab.relay.bytes_down == len(down) + 6
    run(body, PipePool(limit=pipes), early=b"banner")


def test_a_half_close_passes_on_and_the_other_direction_keeps_flowing() -> None:
    """The client's EOF becomes the upstream's EOF; the upstream's answer still arrives;
    the relay closes cleanly once both directions ended, with every pipe back."""
    async def body(lab: Lab) -> None:
        await lab.loop.sock_sendall(lab.app, b"request")
        lab.app.shutdown(socket.SHUT_WR)
        assert await lab.read(lab.peer, 100) == b"request"  # then EOF
        assert not lab.closed
        await lab.loop.sock_sendall(lab.peer, b"answer after the client's EOF")
        lab.peer.shutdown(socket.SHUT_WR)
        assert await lab.read(lab.app, 100) == b"answer after the client's EOF"
        assert await lab.until_closed() == "closed"
        assert lab.pool.in_use == 0
    run(body)


def test_a_reset_upstream_resets_the_client() -> None:
    """An RST from the upstream is passed on as an RST, not a clean EOF."""
    async def body(lab: Lab) -> None:
        lab.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        lab.peer.close()
        assert await lab.until_closed() == "upstream reset"
        with pytest.raises(ConnectionResetError):
            await lab.read(lab.app, 1)
        assert lab.pool.in_use == 0
    run(body)


def test_abort_resets_both_sides_with_its_reason() -> None:
    """The idle timeout and the end of a drain abort a relay: both peers see a reset."""
    async def body(lab: Lab) -> None:
        lab.relay.abort("idle")
        assert lab.closed == ["idle"] and lab.relay.closed
        for sock in (lab.app, lab.peer):
            with pytest.raises(ConnectionResetError):
                await lab.read(sock, 1)
    run(body)
