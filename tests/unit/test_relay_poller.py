"""The relay's own epoll (relay.poller.Poller): callbacks as asyncio's add_reader would call them."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Awaitable, Callable

from metaproxy.relay.poller import Poller


def run(body: Callable[[asyncio.AbstractEventLoop, Poller], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        poller = Poller(loop)
        try:
            return await asyncio.wait_for(body(loop, poller), 5)
        finally:
            poller.close()
    return asyncio.run(main())


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0.01)


def test_reader_is_called_while_data_waits_and_not_after_removal() -> None:
    """Level-triggered like asyncio: unread data keeps waking the reader until it is removed."""
    async def body(loop: asyncio.AbstractEventLoop, poller: Poller) -> list[int]:
        a, b = socket.socketpair()
        calls: list[int] = []
        try:
            poller.add_reader(a.fileno(), lambda: calls.append(1))
            await turns()
            assert calls == []
            b.send(b"x")
            await turns()
            woken = len(calls)
            poller.remove_reader(a.fileno())
            await turns()
            assert len(calls) == woken
            return calls
        finally:
            a.close()
            b.close()
    assert len(run(body)) >= 2


def test_writer_and_reader_on_one_descriptor_are_independent() -> None:
    async def body(loop: asyncio.AbstractEventLoop, poller: Poller) -> tuple[int, int]:
        a, b = socket.socketpair()
        seen = {"r": 0, "w": 0}
        try:
            fd = a.fileno()
            poller.add_reader(fd, lambda: seen.__setitem__("r", seen["r"] + 1))
            poller.add_writer(fd, lambda: (seen.__setitem__("w", seen["w"] + 1), poller.remove_writer(fd)))
            await turns()
            assert seen == {"r": 0, "w": 1}, seen  # writable at once, then removed by its own callback
            b.send(b"x")
            await turns()
            return seen["r"], seen["w"]
        finally:
            a.close()
            b.close()
    readers, writers = run(body)
    assert readers >= 1 and writers == 1


def test_peer_hang_up_wakes_the_reader() -> None:
    """A closed peer must wake the reader (it reads EOF), or a relay would hang."""
    async def body(loop: asyncio.AbstractEventLoop, poller: Poller) -> bytes:
        a, b = socket.socketpair()
        got: list[bytes] = []
        try:
            a.setblocking(False)

            def readable() -> None:
                got.append(a.recv(10))
                poller.remove_reader(a.fileno())
            poller.add_reader(a.fileno(), readable)
            b.close()
            await turns()
            return got[0] if got else b"<not woken>"
        finally:
            a.close()
    assert run(body) == b""


def test_a_failing_callback_is_reported_and_the_others_still_run() -> None:
    async def body(loop: asyncio.AbstractEventLoop, poller: Poller) -> tuple[list[str], list[str]]:
        reported: list[str] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
        pairs = [socket.socketpair() for _ in range(2)]
        ran: list[str] = []
        try:
            def boom() -> None:
                poller.remove_reader(pairs[0][0].fileno())
                raise RuntimeError("bug")

            def fine() -> None:
                ran.append("fine")
                poller.remove_reader(pairs[1][0].fileno())
            poller.add_reader(pairs[0][0].fileno(), boom)
            poller.add_reader(pairs[1][0].fileno(), fine)
            pairs[0][1].send(b"x")
            pairs[1][1].send(b"x")
            await turns()
            return reported, ran
        finally:
            for a, b in pairs:
                a.close()
                b.close()
    reported, ran = run(body)
    assert reported == ["exception in a relay callback"] and ran == ["fine"]


def test_a_number_closed_behind_its_back_and_reused_registers_afresh() -> None:
    """A descriptor closed while registered (the kernel drops it from the epoll) whose
    number is reused by a new socket can be registered again."""
    async def body(loop: asyncio.AbstractEventLoop, poller: Poller) -> int:
        a, b = socket.socketpair()
        fd = a.fileno()
        poller.add_reader(fd, lambda: None)
        a.close()
        b.close()
        c, d = socket.socketpair()
        calls: list[int] = []
        try:
            poller.add_writer(c.fileno(), lambda: calls.append(1))  # may be the same number
            poller.remove_reader(fd)
            await turns()
            poller.remove_writer(c.fileno())
            return len(calls)
        finally:
            c.close()
            d.close()
    assert run(body) >= 1
