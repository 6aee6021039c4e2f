"""A bounded pool of kernel pipes for zero-copy splice().

splice() moves bytes socket -> pipe -> socket inside the kernel, so Python never
touches the payload. A pipe costs two descriptors and kernel memory, so an idle
connection holds none: a direction borrows a pipe when data arrives and returns
it as soon as the pipe is drained. Beyond ``limit`` pipes, directions fall back
to recv/send through a shared buffer rather than fail.
"""

from __future__ import annotations

import fcntl
import os

F_SETPIPE_SZ = 1031
PIPE_BYTES = 256 * 1024


class PipePool:
    __slots__ = ("_free", "_out", "limit")

    def __init__(self, limit: int = 256) -> None:
        self._free: list[tuple[int, int]] = []
        self._out = 0
        self.limit = limit

    def take(self) -> tuple[int, int] | None:
        if self._free:
            self._out += 1
            return self._free.pop()
        if self._out >= self.limit:
            return None
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None  # out of descriptors: the copy path still works
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # over pipe-user-pages-soft the kernel keeps the default size; still correct
        self._out += 1
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        """Return a drained pipe. The caller guarantees it is empty."""
        self._out -= 1
        self._free.append(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes (its connection was reset)."""
        self._out -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        for r, w in self._free:
            os.close(r)
            os.close(w)
        self._free.clear()

    @property
    def in_use(self) -> int:
        return self._out
