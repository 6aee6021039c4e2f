"""The forked-child harness of the privileged tests, and tests of the harness itself.

Dropping privileges and loading a seccomp filter cannot be undone, and a
filter in kill mode ends the whole process: each such test runs its body in a
forked child. The child sends back what the body returned (as JSON) or the
exception it raised; the parent reports how the child ended. The tests at the
bottom show that the harness tells these outcomes apart, so a sandbox test
cannot pass because the harness lost a kill or an exception.

These tests need root and Debian's python3-prctl and python3-seccomp. Without
them they fail, with the reason; METAPROXY_ALLOW_SKIP=1 turns that into a skip.
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
from typing import Any

import pytest


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


def test_harness_returns_the_value_of_the_body() -> None:
    """A body that returns gives exit 0 and its value."""
    outcome = in_child(lambda: {"pid": os.getpid()})
    assert outcome.ok and outcome.value["pid"] != os.getpid(), outcome


def test_harness_reports_an_exception_with_its_type() -> None:
    """A body that raises gives exit 1 and 'Type: message'."""
    def body() -> None:
        raise PermissionError("step x failed")
    outcome = in_child(body)
    assert outcome.code == 1 and outcome.error == "PermissionError: step x failed", outcome


def test_harness_reports_the_signal_that_killed_the_child() -> None:
    """A child killed by SIGSYS is reported as such, never as a success."""
    outcome = in_child(lambda: os.kill(os.getpid(), signal.SIGSYS))
    assert outcome.signal == signal.SIGSYS and not outcome.ok, outcome


def test_harness_kills_a_child_that_hangs() -> None:
    """A body that never ends is killed at the timeout and reported as killed."""
    outcome = in_child(lambda: time.sleep(60), timeout=0.5)
    assert outcome.signal == signal.SIGKILL, outcome
