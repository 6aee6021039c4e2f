"""The daemon's epoll (relay.poller.Poller): relay callbacks as asyncio's add_reader would call
them, both as the loop's own selector (the daemon) and woken as a reader of another loop;
and asyncio's own registrations through it."""

from __future__ import annotations

import asyncio
import selectors
import socket
import time
from typing import Any, Awaitable, Callable

import pytest

from metaproxy.relay.poller import Poller, new_event_loop, poller_for


@pytest.fixture(params=["selector", "attached"])
def mode(request: pytest.FixtureRequest) -> str:
    """selector: the loop of new_event_loop() (the daemon's); attached: asyncio's default loop."""
    return str(request.param)


def run(body: Callable[[asyncio.AbstractEventLoop, Poller], Awaitable[Any]], mode: str) -> Any:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        poller = poller_for(loop)
        # As the loop's selector it holds asyncio's registrations (its self-pipe at least).
        assert (len(poller.get_map()) > 0) == (mode == "selector")
        try:
            return await asyncio.wait_for(body(loop, poller), 5)
        finally:
            if mode == "attached":
                poller.close()
    if mode == "attached":
        return asyncio.run(main())
    loop = new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0.01)


def test_reader_is_called_while_data_waits_and_not_after_removal(mode: str) -> None:
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
    assert len(run(body, mode)) >= 2


def test_writer_and_reader_on_one_descriptor_are_independent(mode: str) -> None:
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
    readers, writers = run(body, mode)
    assert readers >= 1 and writers == 1


def test_peer_hang_up_wakes_the_reader(mode: str) -> None:
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
    assert run(body, mode) == b""


def test_a_failing_callback_is_reported_and_the_others_still_run(mode: str) -> None:
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
    reported, ran = run(body, mode)
    assert reported == ["exception in a relay callback"] and ran == ["fine"]


def test_a_number_closed_behind_its_back_and_reused_registers_afresh(mode: str) -> None:
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
    assert run(body, mode) >= 1


def test_asyncio_streams_timers_and_relay_callbacks_share_the_selector() -> None:
    """On the daemon's loop, asyncio's own servers, streams and timers still work beside
    relay callbacks, and neither side can take the other's descriptor."""
    async def main() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        poller = poller_for(loop)
        echoed: list[bytes] = []

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        a, b = socket.socketpair()
        calls: list[int] = []
        try:
            poller.add_reader(a.fileno(), lambda: (calls.append(1), a.recv(10)))
            b.send(b"x")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            echoed.append(await asyncio.wait_for(reader.readexactly(5), 5))
            writer.close()
            await asyncio.sleep(0.01)  # a timer, through select()'s timeout
            with pytest.raises(KeyError):
                poller.add_reader(server.sockets[0].fileno(), lambda: None)
            with pytest.raises(KeyError):
                loop.add_reader(a.fileno(), lambda: None)
            return echoed[0], len(calls)
        finally:
            poller.remove_reader(a.fileno())
            server.close()
            a.close()
            b.close()
    loop = new_event_loop()
    try:
        data, calls = loop.run_until_complete(asyncio.wait_for(main(), 10))
    finally:
        loop.close()
    assert data == b"hello" and calls >= 1


def test_selector_waits_at_least_its_timeout_and_returns_asyncios_events() -> None:
    """select() waits at least its timeout (epoll counts milliseconds) and returns asyncio's events."""
    poller = Poller()
    a, b = socket.socketpair()
    try:
        started = time.monotonic()
        assert poller.select(0.0004) == []
        assert time.monotonic() - started >= 0.0004
        key = poller.register(a, selectors.EVENT_READ, "data")
        assert poller.get_key(a) is key and poller.get_map()[a.fileno()] is key
        b.send(b"x")
        assert poller.select(1) == [(key, selectors.EVENT_READ)]
        key = poller.modify(a, selectors.EVENT_READ | selectors.EVENT_WRITE, "more")
        assert poller.select(0) == [(key, selectors.EVENT_READ | selectors.EVENT_WRITE)]
        poller.unregister(a)
        assert poller.select(0) == [] and len(poller.get_map()) == 0
    finally:
        poller.close()
        a.close()
        b.close()


def test_a_number_one_side_closed_without_removing_is_free_for_the_other() -> None:
    """asyncio and the relays share one epoll: a descriptor closed while registered (the
    kernel drops it) leaves an entry behind, which must neither block the number's next
    owner nor ever call the old callback for it."""
    poller = Poller()
    stale: list[str] = []
    try:
        a, b = socket.socketpair()
        poller.add_reader(a.fileno(), lambda: stale.append("relay"))
        number = a.fileno()
        a.close()
        b.close()
        c, d = socket.socketpair()
        try:
            assert c.fileno() == number  # Linux gives the lowest free number
            key = poller.register(c, selectors.EVENT_READ, "asyncio")
            d.send(b"x")
            assert poller.select(1) == [(key, selectors.EVENT_READ)] and stale == []
            poller.unregister(c)
        finally:
            c.close()
            d.close()
        e, f = socket.socketpair()
        key = poller.register(e, selectors.EVENT_READ, "asyncio")
        number = e.fileno()
        e.close()
        f.close()
        g, h = socket.socketpair()
        try:
            assert g.fileno() == number
            calls: list[str] = []
            poller.add_reader(g.fileno(), lambda: calls.append("relay"))
            h.send(b"x")
            assert poller.select(1) == [] and calls == ["relay"]
            assert len(poller.get_map()) == 0
            poller.remove_reader(g.fileno())
        finally:
            g.close()
            h.close()
    finally:
        poller.close()
