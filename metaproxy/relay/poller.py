"""One epoll for the whole daemon: asyncio's selector, and the relays' callbacks.

asyncio's add_reader() keeps a Handle, a context copy and a selector key per
callback, and sends every event through its ready queue. Relays are woken
once per chunk and hold two sockets each, so that was most of their Python
time and a fifth of an idle relay's memory. The Poller takes the relays' and
dials' callbacks itself and calls them straight from its epoll.

It is also a ``selectors.BaseSelector``: the daemon's event loop,
``asyncio.SelectorEventLoop(poller)`` (``new_event_loop()`` here), selects on
it, so a wakeup for a relay costs one epoll_wait and one Python call, not a
second epoll and a pass through asyncio's queue. asyncio's own registrations
(listeners, its self-pipe) come back from ``select()`` as usual. Any other
loop (uvloop, or a test's ``asyncio.run()``) gets a Poller that it wakes as
one reader, which is what ``poller_for()`` returns for it.

Level-triggered, with HUP and ERR waking both sides, as asyncio's selector.
"""

from __future__ import annotations

import asyncio
import math
import select
import selectors
import time
import weakref
from typing import Any, Callable, Iterator, Mapping

_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
# Events taken per wakeup. poll()'s default, 1,023, makes CPython allocate a
# 12 KiB event array on every call; what is left over comes at the next turn.
_MAX_EVENTS = 256

ErrorReport = Callable[[dict[str, Any]], object]

# The Poller of each loop that new_event_loop() built, for poller_for().
_built: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, "Poller"] = weakref.WeakKeyDictionary()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The daemon's event loop: asyncio's, selecting on a Poller.

    Under another event loop policy (the bench can try uvloop), that policy's
    loop, which poller_for() then gives a Poller to wake as one reader.
    """
    if type(asyncio.get_event_loop_policy()) is not asyncio.DefaultEventLoopPolicy:
        return asyncio.new_event_loop()
    poller = Poller()
    loop = asyncio.SelectorEventLoop(poller)
    poller.report = loop.call_exception_handler
    _built[loop] = poller
    return loop


def poller_for(loop: asyncio.AbstractEventLoop) -> "Poller":
    """The Poller of ``loop``: its selector if new_event_loop() built it, else one it wakes."""
    poller = _built.get(loop)
    if poller is None:
        poller = Poller()
        poller.attach(loop)
    return poller


def _fd(fileobj: Any) -> int:
    fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd} for the selector")
    return int(fd)


class _Keys(Mapping[Any, selectors.SelectorKey]):
    """get_map(): asyncio's registrations by file object, as the stdlib selectors give them."""

    __slots__ = ("_keys",)

    def __init__(self, keys: dict[int, selectors.SelectorKey]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys[_fd(fileobj)]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys)


class Poller(selectors.BaseSelector):
    """Readiness callbacks for dials and relays, and asyncio's selector, on one epoll."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._keys: dict[int, selectors.SelectorKey] = {}  # asyncio's, by fd
        self._readers: dict[int, Callable[[], object]] = {}
        self._writers: dict[int, Callable[[], object]] = {}
        self._masks: dict[int, int] = {}  # the relays' epoll masks, by fd
        self._attached: asyncio.AbstractEventLoop | None = None
        # A failing callback is reported here, as asyncio reports a failing
        # handle; new_event_loop() and attach() point it at the loop.
        self.report: ErrorReport = lambda context: None
        # The loop's clock: asyncio's loop.time() is time.monotonic() too.
        self.time = time.monotonic

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Be woken by a loop that selects on something else, as one reader of it."""
        self._attached = loop
        self.report = loop.call_exception_handler
        loop.add_reader(self._epoll.fileno(), self.select, 0)

    # -- the relays' and dials' callbacks ----------------------------------------

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

    def _update(self, fd: int) -> None:
        mask = (select.EPOLLIN if fd in self._readers else 0) | (select.EPOLLOUT if fd in self._writers else 0)
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        try:
            if not old:
                self._epoll.register(fd, mask)
                # An asyncio entry for this number is stale (its descriptor was
                # closed without being unregistered): the epoll had no such one.
                self._keys.pop(fd, None)
            elif mask:
                self._epoll.modify(fd, mask)
            else:
                self._epoll.unregister(fd)
        except FileNotFoundError:
            # Closed without being removed here first (closing drops it from
            # the epoll), and the number reused: start afresh.
            if mask:
                self._epoll.register(fd, mask)
        except FileExistsError:
            self._readers.pop(fd, None)
            self._writers.pop(fd, None)
            raise KeyError(f"poller: descriptor {fd} is watched by asyncio; a relay cannot watch it too") from None
        if mask:
            self._masks[fd] = mask
        else:
            del self._masks[fd]

    # -- selectors.BaseSelector, for asyncio --------------------------------------

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            raise ValueError(f"poller: invalid events {events!r}")
        fd = _fd(fileobj)
        if fd in self._keys:
            raise KeyError(f"poller: {fileobj!r} (descriptor {fd}) is already registered")
        try:
            self._epoll.register(fd, _epoll_mask(events))
        except FileExistsError:
            raise KeyError(f"poller: descriptor {fd} is a relay's; asyncio cannot watch it too") from None
        # A relay's entries for this number are stale (that socket was closed
        # without being removed, and closing dropped it from the epoll): their
        # callbacks must never run for the new descriptor.
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._masks.pop(fd, None)
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key = self._keys.pop(_fd(fileobj))
        try:
            self._epoll.unregister(key.fd)
        except OSError:
            pass  # closed already: the kernel dropped it from the epoll
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = _fd(fileobj)
        key = self._keys[fd]
        if events == key.events:
            key = key._replace(data=data)
        else:
            if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
                raise ValueError(f"poller: invalid events {events!r}")
            self._epoll.modify(fd, _epoll_mask(events))
            key = selectors.SelectorKey(key.fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return _Keys(self._keys)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait, call the relays' callbacks that are due, return asyncio's events."""
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:
            # epoll_wait counts in milliseconds: round up, never wake early.
            timeout = math.ceil(timeout * 1e3) * 1e-3
        try:
            ready = self._epoll.poll(timeout, _MAX_EVENTS)
        except InterruptedError:
            return []
        # A callback may remove or add registrations of later events in this
        # batch (a relay that closes, or resumes reading): hence the lookups at
        # the time of each call. A callback woken by HUP/ERR it did not ask
        # for sees EOF or an error on its own read, as with asyncio.
        # This loop runs once per relayed chunk: the calls are inline, not
        # through a helper, because a Python call here is a measurable share
        # of the daemon's CPU per GB (make bench).
        keys, readers, writers = self._keys, self._readers, self._writers
        theirs: list[tuple[selectors.SelectorKey, int]] = []
        for fd, events in ready:
            try:
                if events & _READABLE and (callback := readers.get(fd)) is not None:
                    callback()
                if events & _WRITABLE and (callback := writers.get(fd)) is not None:
                    callback()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                # As asyncio does for a failing callback: report it, carry on
                # (a writer skipped here is woken again: level-triggered).
                self.report({"message": "exception in a relay callback", "exception": exc})
            if (key := keys.get(fd)) is not None:
                mask = ((selectors.EVENT_READ if events & ~select.EPOLLOUT else 0)
                        | (selectors.EVENT_WRITE if events & ~select.EPOLLIN else 0))
                theirs.append((key, mask & key.events))
        return theirs

    def close(self) -> None:
        if self._attached is not None:
            self._attached.remove_reader(self._epoll.fileno())
            self._attached = None
        self._keys.clear()
        self._epoll.close()


def _epoll_mask(events: int) -> int:
    return ((select.EPOLLIN if events & selectors.EVENT_READ else 0)
            | (select.EPOLLOUT if events & selectors.EVENT_WRITE else 0))
