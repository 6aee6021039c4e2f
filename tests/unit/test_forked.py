"""The forked-child harness of the sandbox tests (tests/unit/forked.py), tested itself.

in_child() must tell apart a body that returned, one that raised, a child killed
by a signal and one that hung: otherwise a sandbox test could pass because the
harness lost a kill or an exception. Root only, as the tests that use it.
"""

from __future__ import annotations

import os
import signal
import time

from tests.unit.forked import in_child


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
