"""Moving bytes both ways between a client and its upstream.

Each direction is driven by readiness callbacks, not a task, so an idle
connection costs two sockets and two small objects. The callbacks come from
the ``Poller`` (metaproxy.relay.poller). Bytes move with splice() through a
borrowed pipe; Python never sees the payload unless the pipe pool is
exhausted, when a shared buffer takes over.

Closing follows TCP: EOF on one side becomes shutdown(SHUT_WR) on the other
(half-close), and a reset on either side resets both.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Callable, Protocol

from metaproxy.relay.pipes import PipePool

CHUNK = 256 * 1024
# Debian 12's mypy (typeshed) predates os.splice, Debian 13's knows it: getattr
# reads the same on both (Python 3.10+ on Linux has it).
_splice: Callable[..., int] = getattr(os, "splice")
_SPLICE_FLAGS: int = getattr(os, "SPLICE_F_MOVE") | getattr(os, "SPLICE_F_NONBLOCK")
_LINGER_RESET = struct.pack("ii", 1, 0)
_copy_buffer = bytearray(CHUNK)
_copy_view = memoryview(_copy_buffer)


class Scheduler(Protocol):
    """What a relay needs from its event source: the event loop's reader and writer calls."""

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> object: ...
    def add_writer(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_writer(self, fd: int) -> object: ...
    def time(self) -> float: ...


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), so the peer fails fast instead of waiting."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already dead: close() alone is all that is left to do
    sock.close()


class Relay:
    """One relayed connection: client <-> upstream."""

    __slots__ = ("loop", "client", "upstream", "pool", "up", "down", "last_active",
                 "closed", "_on_close")

    def __init__(self, loop: Scheduler, client: socket.socket, upstream: socket.socket,
                 pool: PipePool, on_close: Callable[["Relay", str], None]) -> None:
        self.loop = loop
        self.client = client
        self.upstream = upstream
        self.pool = pool
        self.up = _Direction(self, client, upstream)
        self.down = _Direction(self, upstream, client)
        self.last_active = loop.time()
        self.closed = False
        self._on_close = on_close

    def start(self, early: bytes = b"") -> None:
        """Begin relaying; ``early`` is payload that arrived with the upstream's reply."""
        self.up.start(b"")
        self.down.start(early)

    @property
    def bytes_up(self) -> int:
        return self.up.count

    @property
    def bytes_down(self) -> int:
        return self.down.count

    def direction_done(self) -> None:
        if self.up.done and self.down.done:
            self._finish("closed", clean=True)

    def fail(self, err: OSError, side: socket.socket) -> None:
        who = "client" if side is self.client else "upstream"
        if err.errno in (errno.ECONNRESET, errno.EPIPE):
            self._finish(f"{who} reset", clean=False)
        else:
            self._finish(f"{who} error: {os.strerror(err.errno) if err.errno else err}", clean=False)

    def abort(self, reason: str) -> None:
        """Reset both sides (idle timeout, shutdown after the drain time)."""
        self._finish(reason, clean=False)

    def _finish(self, reason: str, clean: bool) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        for sock in (self.client, self.upstream):
            fd = sock.fileno()
            if fd >= 0:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
        self.up.release()
        self.down.release()
        if clean:
            self.client.close()
            self.upstream.close()
        else:
            reset(self.client)
            reset(self.upstream)
        self._on_close(self, reason)
        # The relay and its directions point at each other. Break that cycle,
        # so that reference counting frees all three (and the sockets) now:
        # left to the cyclic GC, closed relays stay in memory until a full
        # collection, which a quiet daemon may not run for hours.
        del self.up.relay, self.down.relay


class _Direction:
    """Bytes from ``src`` to ``dst``."""

    __slots__ = ("relay", "src", "dst", "sfd", "dfd", "pipe", "in_pipe", "backlog", "count",
                 "done", "writing", "paused")

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0
        self.backlog = b""
        self.count = 0
        self.done = False
        self.writing = False  # a writer callback waits for dst to drain
        self.paused = True  # no reader callback on src

    def start(self, early: bytes) -> None:
        # Early payload goes first; _flush starts reading src once it is out.
        self.backlog = early
        self._flush()

    def _readable(self) -> None:
        relay = self.relay
        relay.last_active = relay.loop.time()
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = relay.pool.take()
            if pipe is None:
                self._copy()
                return
        try:
            n = _splice(self.sfd, pipe[1], CHUNK, None, None, _SPLICE_FLAGS)
        except BlockingIOError:
            self._return_pipe()
            return
        except OSError as e:
            relay.fail(e, self.src)
            return
        if n == 0:
            self._return_pipe()
            self._eof()
            return
        # Once per chunk, so the usual case is in line: all of it goes out at
        # once and the pipe goes back to the pool empty. Anything else (dst
        # full, or an error, which _flush meets again) takes the general path.
        try:
            moved = _splice(pipe[0], self.dfd, n, None, None, _SPLICE_FLAGS)
        except OSError:
            moved = 0
        self.count += moved
        if moved == n:
            self.pipe = None
            relay.pool.give(pipe)
            return
        self.in_pipe = n - moved
        self._flush()

    def _copy(self) -> None:
        """The fallback when no pipe is free: recv into a shared buffer, send on."""
        try:
            n = self.src.recv_into(_copy_buffer)
        except BlockingIOError:
            return
        except OSError as e:
            self.relay.fail(e, self.src)
            return
        if n == 0:
            self._eof()
            return
        self.backlog = bytes(_copy_view[:n])
        self._flush()

    def _flush(self) -> None:
        """Write what is pending; if dst is full, stop reading src until it drains."""
        try:
            while self.backlog:
                sent = self.dst.send(self.backlog)
                self.count += sent
                self.backlog = self.backlog[sent:]
            while self.in_pipe and self.pipe is not None:
                moved = _splice(self.pipe[0], self.dfd, self.in_pipe, None, None, _SPLICE_FLAGS)
                self.count += moved
                self.in_pipe -= moved
        except BlockingIOError:
            # Back-pressure: stop reading src until dst has room again.
            loop = self.relay.loop
            if not self.writing:
                self.writing = True
                loop.add_writer(self.dfd, self._writable)
            if not self.paused:
                self.paused = True
                loop.remove_reader(self.sfd)
            return
        except OSError as e:
            self.relay.fail(e, self.dst)
            return
        self._return_pipe()
        # Only touch the selector on a state change: re-registering on every
        # chunk would cost a syscall and an allocation per read.
        if self.writing:
            self.writing = False
            self.relay.loop.remove_writer(self.dfd)
        if self.paused:
            self.paused = False
            self.relay.loop.add_reader(self.sfd, self._readable)

    def _writable(self) -> None:
        self.relay.last_active = self.relay.loop.time()
        self._flush()

    def _eof(self) -> None:
        self.paused = True
        self.relay.loop.remove_reader(self.sfd)
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                self.relay.fail(e, self.dst)
                return
        self.done = True
        self.relay.direction_done()

    def _return_pipe(self) -> None:
        if self.pipe is not None and not self.in_pipe:
            self.relay.pool.give(self.pipe)
            self.pipe = None

    def release(self) -> None:
        """At close: an empty pipe goes back to the pool, one with bytes is closed."""
        if self.pipe is not None:
            if self.in_pipe:
                self.relay.pool.discard(self.pipe)
            else:
                self.relay.pool.give(self.pipe)
            self.pipe = None
            self.in_pipe = 0
