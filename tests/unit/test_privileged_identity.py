"""drop_privileges() and restrict_unprivileged(), each in a forked child (root only).

The drop is proven from /proc/self/status, read by the test's own code, and by
trying to regain root. The refusals show that a step that fails, or that
silently does not take effect, raises PrivilegeError naming the step: the
daemon never carries on half-dropped.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import threading
from typing import Any

from metaproxy.privileged import drop_privileges, restrict_unprivileged
from tests.unit.forked import in_child, proc_status

NOBODY = pwd.getpwnam("nobody")
NO_CAPS = "0" * 16


def _state() -> dict[str, Any]:
    import prctl
    status = proc_status()
    keys = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
    return {**{k: status[k] for k in keys}, "dumpable": bool(prctl.get_dumpable()), "cwd": os.getcwd()}


def test_drop_to_nobody_leaves_no_id_capability_or_way_back() -> None:
    """After the drop every uid and gid is nobody's, there are no supplementary groups,
    every capability set and the bounding set are empty, no-new-privs is set, the
    process is not dumpable and its working directory is /."""
    def body() -> dict[str, Any]:
        os.chdir("/tmp")
        drop_privileges("nobody")
        return _state()
    outcome = in_child(body)
    assert outcome.ok, outcome
    state = outcome.value
    assert state["Uid"].split() == [str(NOBODY.pw_uid)] * 4, state
    assert state["Gid"].split() == [str(NOBODY.pw_gid)] * 4, state
    assert state["Groups"] == "", state
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert state[key] == NO_CAPS, (key, state)
    assert state["NoNewPrivs"] == "1" and state["dumpable"] is False and state["cwd"] == "/", state


def test_after_the_drop_every_way_back_to_root_fails() -> None:
    """setuid(0), setgid(0), setresuid(0,0,0), setgroups([0]) all fail with EPERM, and
    a root-only file stays closed."""
    def body() -> dict[str, str]:
        drop_privileges("nobody")
        results = {}
        for name, attempt in (("setuid", lambda: os.setuid(0)), ("setgid", lambda: os.setgid(0)),
                              ("setresuid", lambda: os.setresuid(0, 0, 0)),
                              ("setgroups", lambda: os.setgroups([0])),
                              ("open /etc/shadow", lambda: open("/etc/shadow", "rb"))):
            try:
                attempt()
                results[name] = "succeeded"
            except OSError as exc:
                results[name] = errno.errorcode[exc.errno or 0]
        return results
    outcome = in_child(body)
    assert outcome.ok, outcome
    assert outcome.value == {"setuid": "EPERM", "setgid": "EPERM", "setresuid": "EPERM",
                             "setgroups": "EPERM", "open /etc/shadow": "EACCES"}, outcome


def test_the_drop_keeps_no_capability_and_leaves_keepcaps_off() -> None:
    """drop_privileges() takes only the user and the groups to keep: there is no way to
    keep a capability (the unused keep_caps path is gone), PR_SET_KEEPCAPS stays off, and
    binding a port below 1024 afterwards is refused."""
    import inspect
    assert list(inspect.signature(drop_privileges).parameters) == ["user", "groups"]
    def body() -> dict[str, Any]:
        import prctl
        drop_privileges("nobody")
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 1023))
                bound = "bound"
            except OSError as exc:
                bound = errno.errorcode[exc.errno or 0]
        return {"keepcaps": bool(prctl.get_keepcaps()), "bind 1023": bound}
    outcome = in_child(body)
    assert outcome.ok and outcome.value == {"keepcaps": False, "bind 1023": "EACCES"}, outcome


def test_drop_keeps_exactly_the_named_groups_and_proc_shows_them() -> None:
    """drop_privileges("nobody", ["daemon"]): /proc/self/status shows Groups: with the
    daemon group's gid and nothing else (none of root's), the ids are nobody's, and the
    group cannot be swapped for root's afterwards."""
    daemon = grp.getgrnam("daemon").gr_gid
    def body() -> dict[str, Any]:
        os.setgroups([0, daemon, 4])  # root's own list, which must not survive
        drop_privileges("nobody", ["daemon", "daemon"])
        try:
            os.setgroups([0])
            regained = "succeeded"
        except OSError as exc:
            regained = errno.errorcode[exc.errno or 0]
        return {**_state(), "regain": regained}
    outcome = in_child(body)
    assert outcome.ok, outcome
    state = outcome.value
    assert state["Groups"].split() == [str(daemon)], state
    assert state["Uid"].split() == [str(NOBODY.pw_uid)] * 4 and state["regain"] == "EPERM", state


def test_unknown_or_root_group_is_refused_before_anything_changes() -> None:
    """A group missing from the group database, or group 0, raises PrivilegeError naming
    the step and the group while the process is still root."""
    error, state = _refusal(lambda: drop_privileges("nobody", ["no-such-metaproxy-group"]))
    assert "resolve groups" in error and "no-such-metaproxy-group" in error, error
    assert state["Uid"].split() == ["0"] * 4, state
    error, _ = _refusal(lambda: drop_privileges("nobody", [grp.getgrgid(0).gr_name]))
    assert "resolve groups" in error and "group 0" in error, error


def _refusal(body: Any) -> tuple[str, dict[str, Any]]:
    """Run a body that must raise; returns its error and the state after the refusal."""
    def wrapped() -> dict[str, Any]:
        try:
            body()
        except PermissionError as exc:  # PrivilegeError subclasses it
            return {"error": f"{type(exc).__name__}: {exc}", "state": _state()}
        return {"error": "", "state": _state()}
    outcome = in_child(wrapped)
    assert outcome.ok, outcome
    return outcome.value["error"], outcome.value["state"]


def test_unknown_user_is_refused_before_anything_changes() -> None:
    """A service user missing from passwd raises PrivilegeError naming the step and the
    user, while the process is still untouched root."""
    error, state = _refusal(lambda: drop_privileges("no-such-metaproxy-user"))
    assert error.startswith("PrivilegeError") and "resolve service user" in error, error
    assert "no-such-metaproxy-user" in error, error
    assert state["Uid"].split() == ["0"] * 4, state


def test_root_is_refused_as_the_service_user() -> None:
    """Dropping 'to root' is refused: it would be no drop at all."""
    error, _ = _refusal(lambda: drop_privileges("root"))
    assert error.startswith("PrivilegeError") and "must not be root" in error, error


def test_drop_refuses_when_not_root() -> None:
    """A second drop (the process is no longer root) says so instead of failing obscurely."""
    def body() -> None:
        drop_privileges("nobody")
        drop_privileges("nobody")
    error, _ = _refusal(body)
    assert error.startswith("PrivilegeError") and "not root" in error, error


def test_drop_refuses_while_other_threads_run() -> None:
    """Capabilities and prctl state are per thread: with a second thread the drop is
    refused, since that thread would stay root."""
    def body() -> None:
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        try:
            drop_privileges("nobody")
        finally:
            stop.set()
            thread.join()
    error, state = _refusal(body)
    assert error.startswith("PrivilegeError") and "2 threads" in error, error
    assert state["Uid"].split() == ["0"] * 4, state


def test_failed_step_names_the_step_and_the_errno() -> None:
    """When a step's system call fails, the error names the step, the errno number and symbol."""
    def body() -> None:
        def refuse(groups: list[int]) -> None:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        os.setgroups = refuse
        drop_privileges("nobody")
    error, _ = _refusal(body)
    assert error.startswith("PrivilegeError"), error
    assert "'setgroups'" in error and "errno 1 EPERM" in error, error


def test_a_uid_change_that_did_not_happen_is_caught() -> None:
    """If setresuid() returned without effect, the id check refuses to go on."""
    def body() -> None:
        os.setresuid = lambda *ids: None
        drop_privileges("nobody")
    error, state = _refusal(body)
    assert error.startswith("PrivilegeError") and "verify ids" in error, error
    assert state["Uid"].split() == ["0"] * 4, state


def test_root_that_could_be_regained_is_caught() -> None:
    """If setuid(0) succeeded after the drop, the regain check refuses to go on."""
    def body() -> None:
        os.setuid = lambda uid: None
        drop_privileges("nobody")
    error, _ = _refusal(body)
    assert error.startswith("PrivilegeError") and "setuid(0) succeeded" in error, error


def test_unprivileged_mode_refuses_root() -> None:
    """--unprivileged started as root is refused: root must take the drop."""
    error, _ = _refusal(restrict_unprivileged)
    assert error.startswith("PrivilegeError") and "must not run as root" in error, error


def test_unprivileged_mode_sets_no_new_privs_and_non_dumpable() -> None:
    """Started as nobody, restrict_unprivileged() sets no-new-privs, makes the process
    non-dumpable, and leaves no capability in any set."""
    def body() -> dict[str, Any]:
        os.setgroups([])
        os.setresgid(NOBODY.pw_gid, NOBODY.pw_gid, NOBODY.pw_gid)
        os.setresuid(NOBODY.pw_uid, NOBODY.pw_uid, NOBODY.pw_uid)
        import prctl
        prctl.set_dumpable(True)  # the uid change cleared it; show that the call sets it
        restrict_unprivileged()
        return _state()
    outcome = in_child(body)
    assert outcome.ok, outcome
    state = outcome.value
    assert state["NoNewPrivs"] == "1" and state["dumpable"] is False and state["cwd"] == "/", state
    for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert state[key] == NO_CAPS, (key, state)
