"""Running a test's body in a forked child: the shared harness of the sandbox tests.

Dropping privileges and loading a seccomp filter cannot be undone, and a
filter in kill mode ends the whole process: each such test runs its body in a
forked child, and the parent reports how the child ended. Every wait is
bounded, so a child that hangs fails the test instead of the run.

- run_forked(): for a body that needs no root (a filter in an unprivileged
  child); it must return normally.
- in_child(): for the root-only tests (drop, bind, filter, Landlock); the child
  sends back what the body returned (as JSON) or the exception it raised, and
  the Outcome says how it ended. test_forked.py shows that it tells these
  outcomes apart, so a sandbox test cannot pass because a kill or an exception
  was lost. require_root() fails (or, with METAPROXY_ALLOW_SKIP=1, skips) without
  root and Debian's python3-prctl and python3-seccomp.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

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


def require_root() -> None:
    """Fail (or, with METAPROXY_ALLOW_SKIP=1, skip) unless root with prctl and seccomp."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (they bind, drop privileges and load seccomp filters)")
    for module, package in (("prctl", "python3-prctl"), ("seccomp", "python3-seccomp")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{package} (run Debian's /usr/bin/python3, not {sys.executable})")
    if not missing:
        return
    message = "the privileged tests need " + " and ".join(missing)
    if os.environ.get("METAPROXY_ALLOW_SKIP") == "1":
        pytest.skip(message)
    pytest.fail(message + "; set METAPROXY_ALLOW_SKIP=1 to skip them instead", pytrace=False)


@dataclass(frozen=True)
class Outcome:
    """How a forked child ended: by a signal, or with an exit code and a value or error."""

    signal: int | None
    code: int | None
    value: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.error


def in_child(body: Callable[[], Any], timeout: float = 30) -> Outcome:
    """Run body() in a forked child; returns how it ended. Only root runs this."""
    require_root()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGSYS leaves no core file
            payload = {"value": body()}
            code = 0
        except BaseException as exc:  # everything goes back to the parent, then _exit
            payload = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            os.write(write_end, json.dumps(payload, default=repr).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    data = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = pipe.read(65536)
            if not chunk:
                break
            data += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    payload = json.loads(data) if data else {}
    if os.WIFSIGNALED(status):
        return Outcome(os.WTERMSIG(status), None, payload.get("value"), payload.get("error", ""))
    return Outcome(None, os.WEXITSTATUS(status), payload.get("value"), payload.get("error", ""))


def proc_status(path: str = "/proc/self/status") -> dict[str, str]:
    """Read independently of metaproxy.privileged, so the tests do not trust its reader."""
    with open(path, encoding="ascii") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
