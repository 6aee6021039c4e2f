"""The pool of splice() pipes (metaproxy.relay.pipes): what it lends, takes back and closes.

Every pipe is two descriptors, so the accounting must be exact: ``in_use``
counts what is lent, a returned pipe is lent again before a new one is made,
a discarded one is closed, close() closes what is free, and past ``limit`` (or
without descriptors) take() answers None so the relay falls back to copying.
"""

from __future__ import annotations

import fcntl
import os
import resource

from metaproxy.relay.pipes import PIPE_BYTES, PipePool
from tests.unit.forked import run_forked

F_GETPIPE_SZ = 1032
DEFAULT_PIPE_BYTES = 64 * 1024


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_lent_pipe_is_non_blocking_close_on_exec_and_enlarged() -> None:
    pool = PipePool()
    pipe = pool.take()
    assert pipe is not None and pool.in_use == 1
    try:
        for fd in pipe:
            assert not os.get_blocking(fd) and not os.get_inheritable(fd)
        # Over pipe-user-pages-soft the kernel keeps its default size: still correct.
        assert fcntl.fcntl(pipe[1], F_GETPIPE_SZ) in (PIPE_BYTES, DEFAULT_PIPE_BYTES)
    finally:
        pool.discard(pipe)


def test_a_returned_pipe_is_lent_again_before_a_new_one_is_made() -> None:
    pool = PipePool()
    first = pool.take()
    assert first is not None
    pool.give(first)
    assert pool.in_use == 0
    again = pool.take()
    assert again == first and pool.in_use == 1
    pool.give(again)
    pool.close()


def test_past_the_limit_take_answers_none_until_one_comes_back() -> None:
    pool = PipePool(limit=2)
    a, b = pool.take(), pool.take()
    assert a is not None and b is not None and a != b
    assert pool.take() is None and pool.in_use == 2
    pool.give(a)
    assert pool.take() == a
    for pipe in (a, b):
        pool.discard(pipe)
    assert pool.in_use == 0


def test_a_discarded_pipe_is_closed_and_close_closes_the_free_ones() -> None:
    pool = PipePool()
    kept, dropped = pool.take(), pool.take()
    assert kept is not None and dropped is not None
    pool.discard(dropped)
    assert pool.in_use == 1 and not any(_is_open(fd) for fd in dropped)
    pool.give(kept)
    assert all(_is_open(fd) for fd in kept)
    pool.close()
    assert not any(_is_open(fd) for fd in kept) and pool.in_use == 0


def test_without_descriptors_take_answers_none_and_lends_nothing() -> None:
    """EMFILE is not an error: the relay copies through a buffer instead."""
    def body() -> None:
        lowest = os.dup(0)  # the lowest free number: a limit there leaves none free
        os.close(lowest)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        pool = PipePool()
        if pool.take() is not None or pool.in_use != 0:
            raise SystemExit(1)
    run_forked(body)


def test_a_pool_of_no_pipes_lends_none() -> None:
    assert PipePool(limit=0).take() is None
