"""Running a body in a forked child that may load a seccomp filter (no root needed).

A filter cannot be unloaded, and in kill mode a denied call ends the whole
process: the body runs in a child, and the parent reports how it ended. The
wait is bounded, so a child that hangs fails the test instead of the run.
"""

from __future__ import annotations

import os
import signal
import time
from types import ModuleType
from typing import Callable

import pytest


def require_seccomp() -> ModuleType:
    """python3-seccomp, or a failure (a skip only with METAPROXY_ALLOW_SKIP=1)."""
    try:
        import seccomp  # python3-seccomp, a runtime dependency
    except ImportError:
        if os.environ.get("METAPROXY_ALLOW_SKIP") == "1":
            pytest.skip("python3-seccomp is missing [METAPROXY_ALLOW_SKIP=1]")
        pytest.fail("python3-seccomp is missing (run with /usr/bin/python3); refusing to skip", pytrace=False)
    return seccomp


def run_forked(body: Callable[[], None], timeout: float = 20) -> None:
    """Run body() in a child; fail unless it returns normally within ``timeout``."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child did not finish in {timeout}s", pytrace=False)
        time.sleep(0.01)
    assert not os.WIFSIGNALED(status), f"killed by signal {os.WTERMSIG(status)} (31 is SIGSYS: a denied call)"
    assert os.WEXITSTATUS(status) == 0, f"the child exited {os.WEXITSTATUS(status)}"
