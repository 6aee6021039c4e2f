"""Emptying the capability sets and the bounding set (metaproxy.privileged.capabilities).

Each test runs as root in a forked child (tests/unit/forked.py), and reads the
result from /proc/self/status with the test's own reader. They pin the reasons
the module gives for its order: the bounding set is emptied while CAP_SETPCAP
still works, emptying it does not shrink the permitted set, and verify_empty()
believes /proc, not the calls that were meant to change it. empty_sets() runs
after setresuid(), as in the drop, which has emptied the sets already.
"""

from __future__ import annotations

import os
import re
import pwd
from typing import Any

from metaproxy.errors import PrivilegeError
from metaproxy.privileged import capabilities
from tests.unit.forked import in_child, proc_status

NOBODY = pwd.getpwnam("nobody")
NO_CAPS = "0" * 16
SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def _sets() -> dict[str, str]:
    status = proc_status()
    return {key: status[key] for key in SETS}


def _verify(**kwargs: Any) -> str:
    """verify_empty()'s verdict: 'ok' or the text of its PrivilegeError."""
    try:
        capabilities.verify_empty(**kwargs)
    except PrivilegeError as exc:
        return str(exc)
    return "ok"


def test_emptying_the_bounding_set_leaves_root_s_permitted_set_and_verify_says_so() -> None:
    """After empty_bounding_set() CapBnd is zero, but root still holds its permitted and
    effective capabilities: verify_empty() refuses, naming the set that is not empty."""
    def body() -> dict[str, Any]:
        capabilities.empty_bounding_set()
        return {**_sets(), "verify": _verify()}
    outcome = in_child(body)
    assert outcome.ok, outcome
    state = outcome.value
    assert state["CapBnd"] == NO_CAPS and state["CapPrm"] != NO_CAPS, state
    # verify_empty() names the first set that is not empty: CapPrm on a plain root,
    # CapInh where the manager gave root inheritable capabilities (systemd-nspawn does).
    named = re.search(r"'empty (Cap\w+)' did not take effect", state["verify"])
    assert named and state[named.group(1)] != NO_CAPS, state


def _become_nobody() -> None:
    os.setresgid(NOBODY.pw_gid, NOBODY.pw_gid, NOBODY.pw_gid)
    os.setresuid(NOBODY.pw_uid, NOBODY.pw_uid, NOBODY.pw_uid)


def test_after_the_uid_change_nothing_is_left_and_verify_agrees() -> None:
    """In the drop's order (bounding set as root, then setresuid, then empty_sets())
    every set is empty, and verify_empty() agrees with /proc."""
    def body() -> dict[str, Any]:
        capabilities.empty_bounding_set()
        _become_nobody()
        capabilities.empty_sets()
        return {**_sets(), "verify": _verify()}
    outcome = in_child(body)
    assert outcome.ok, outcome
    state = outcome.value
    assert all(state[key] == NO_CAPS for key in SETS) and state["verify"] == "ok", state


def test_verify_without_the_bounding_set_ignores_only_that_set() -> None:
    """verify_empty(bounding=False) passes with the bounding set still full (an
    unprivileged process cannot empty it), and verify_empty() refuses it by name."""
    def body() -> dict[str, Any]:
        _become_nobody()
        capabilities.empty_sets()
        return {"CapBnd": proc_status()["CapBnd"], "without": _verify(bounding=False), "with": _verify()}
    outcome = in_child(body)
    assert outcome.ok, outcome
    state = outcome.value
    assert state["CapBnd"] != NO_CAPS and state["without"] == "ok", state
    assert "empty CapBnd" in state["with"], state
