"""The helpers every root-phase step goes through (metaproxy.privileged.steps).

A step that fails raises PrivilegeError naming the step, the errno's text and
its symbol; a check reads /proc/self/status and names what it found and what it
expected. No root needed: nothing here changes the process, except in a
forked child.
"""

from __future__ import annotations

import errno
import os
import threading

import pytest

from metaproxy.errors import PrivilegeError
from metaproxy.privileged import steps
from tests.unit.forked import proc_status, run_forked


def _fail(code: int) -> None:
    raise OSError(code, os.strerror(code))


def test_describe_gives_the_text_the_number_and_the_symbol() -> None:
    assert steps.describe(OSError(errno.EPERM, "x")) == "Operation not permitted (errno 1 EPERM)"
    assert steps.describe(OSError("no errno")) == f"{os.strerror(0)} (errno 0 ?)"


def test_a_step_returns_what_its_call_returns() -> None:
    assert steps.step("add", lambda a, b: a + b, 2, 3) == 5


def test_a_failing_step_names_itself_and_the_errno_and_keeps_the_cause() -> None:
    with pytest.raises(PrivilegeError) as caught:
        steps.step("setresuid", _fail, errno.EPERM)
    assert str(caught.value) == "privilege step 'setresuid' failed: Operation not permitted (errno 1 EPERM)"
    assert isinstance(caught.value.__cause__, OSError)


def test_a_missing_module_names_the_debian_package_and_the_python_to_use() -> None:
    with pytest.raises(PrivilegeError) as caught:
        steps.require_module("metaproxy_no_such_module", "python3-no-such")
    assert "python3-no-such" in str(caught.value) and "/usr/bin/python3" in str(caught.value)
    assert isinstance(caught.value.__cause__, ImportError)


def test_status_is_the_kernel_s_own_account() -> None:
    """status() agrees with the test's own reader of /proc/self/status."""
    mine, theirs = proc_status(), steps.status()
    assert theirs["Pid"] == mine["Pid"] == str(os.getpid())
    assert theirs["Uid"] == mine["Uid"]


def test_a_check_that_did_not_take_effect_says_what_proc_shows() -> None:
    pid = str(os.getpid())
    steps.require_status("same pid", "Pid", pid)
    with pytest.raises(PrivilegeError) as caught:
        steps.require_status("check pid", "Pid", "1" + pid)
    assert str(caught.value) == (f"privilege step 'check pid' did not take effect: /proc/self/status "
                                 f"shows Pid {pid}, expected 1{pid}")
    with pytest.raises(PrivilegeError, match="shows NoSuchKey <missing>"):
        steps.require_status("check key", "NoSuchKey", "1")


def test_a_second_thread_is_refused_and_a_single_thread_passes() -> None:
    """The drop changes the calling thread only: another thread would keep root."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with pytest.raises(PrivilegeError, match=r"'check threads' failed: \d+ threads are running"):
            steps.require_single_thread()
    finally:
        stop.set()
        other.join()
    run_forked(steps.require_single_thread)  # a forked child has only the thread that forked
