"""Readiness callbacks from one epoll of our own: the event source of dials and relays."""

from __future__ import annotations

import asyncio
import select
from typing import Callable

_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
# Events taken per dispatch. poll()'s default, 1,023, makes CPython allocate a
# 12 KiB event array on every wakeup; what is left over comes at the next turn.
_MAX_EVENTS = 256


class Poller:
    """Readiness callbacks for upstream dials and relay sockets, from one epoll of our own.

    asyncio's add_reader() keeps a Handle, a context copy and a selector key
    per callback, and sends every event through its ready queue. Relays are
    woken once per chunk and hold two sockets each, so that was most of their
    Python time and a fifth of an idle relay's memory. Here one epoll,
    registered with the loop as a single reader, calls the callbacks directly.
    Level-triggered, with HUP and ERR waking both sides, as asyncio's selector.
    """

    __slots__ = ("_loop", "_epoll", "_readers", "_writers", "_masks", "time")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], object]] = {}
        self._writers: dict[int, Callable[[], object]] = {}
        self._masks: dict[int, int] = {}
        self.time = loop.time
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callable[[], object]) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()

    def _update(self, fd: int) -> None:
        mask = (select.EPOLLIN if fd in self._readers else 0) | (select.EPOLLOUT if fd in self._writers else 0)
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        try:
            if not old:
                self._epoll.register(fd, mask)
            elif mask:
                self._epoll.modify(fd, mask)
            else:
                self._epoll.unregister(fd)
        except FileNotFoundError:
            # Closed without being removed here first (closing drops it from
            # the epoll), and the number reused: start afresh.
            if mask:
                self._epoll.register(fd, mask)
        if mask:
            self._masks[fd] = mask
        else:
            del self._masks[fd]

    def _dispatch(self) -> None:
        # A callback may remove or add registrations of later events in this
        # batch (a relay that closes, or resumes reading): hence the lookups at
        # the time of each call. A callback woken by HUP/ERR it did not ask
        # for sees EOF or an error on its own read, as with asyncio.
        readers, writers = self._readers, self._writers
        for fd, events in self._epoll.poll(0, _MAX_EVENTS):
            if events & _READABLE and (callback := readers.get(fd)) is not None:
                self._call(callback)
            if events & _WRITABLE and (callback := writers.get(fd)) is not None:
                self._call(callback)

    def _call(self, callback: Callable[[], object]) -> None:
        try:
            callback()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            # As asyncio does for a failing callback: report it, carry on.
            self._loop.call_exception_handler({"message": "exception in a relay callback",
                                               "exception": exc})
