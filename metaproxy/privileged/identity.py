"""Becoming the service user, and proving that root cannot come back.

The plan follows OpenSSH's permanently_set_uid() and Tor's switch_id():
 1. Resolve the user while /etc/passwd can still be read.
 2. Refuse if other threads exist: capabilities and prctl() state belong to a
    thread, and a second thread would keep root's.
 3. Empty the bounding set while CAP_SETPCAP still works (capabilities.py).
 4. Supplementary groups, then the gid, then the uid: once the uid has changed,
    the groups could no longer be changed. The groups are exactly those named
    ([daemon] groups, e.g. debian-tor for a GroupWritable SocksPort), none of root's.
 5. Try to regain root: every attempt must fail with EPERM.
 6. Empty the capability sets, set no-new-privs, become non-dumpable, leave
    the working directory; each read back from the kernel.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Sequence

from metaproxy.errors import PrivilegeError
from metaproxy.privileged import capabilities
from metaproxy.privileged.steps import require_single_thread, require_status, status, step


def _resolve(user: str) -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"privilege step 'resolve service user' failed: no user {user!r} in "
                             "the passwd database; install the package, which creates it, or name "
                             "an existing system user") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise PrivilegeError(f"privilege step 'resolve service user' failed: {user!r} has uid "
                             f"{entry.pw_uid} and gid {entry.pw_gid}; it must not be root or group 0")
    return entry


def _resolve_groups(groups: Sequence[str]) -> list[int]:
    gids = []
    for name in groups:
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            raise PrivilegeError(f"privilege step 'resolve groups' failed: no group {name!r} in the group "
                                 "database; install what creates it (tor for debian-tor) or remove it "
                                 "from [daemon] groups") from None
        if gid == 0:
            raise PrivilegeError(f"privilege step 'resolve groups' failed: {name!r} is group 0; root's "
                                 "group must not be kept")
        gids.append(gid)
    return sorted(set(gids))


def _require_ids(uid: int, gid: int, groups: list[int]) -> None:
    kernel = sorted(int(g) for g in status().get("Groups", "?").split())  # the kernel's own account
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3 or sorted(os.getgroups()) != groups \
            or kernel != groups:
        raise PrivilegeError(f"privilege step 'verify ids' failed: uids {os.getresuid()}, gids "
                             f"{os.getresgid()}, groups {os.getgroups()} (/proc: {kernel}); expected uid "
                             f"{uid}, gid {gid} and supplementary groups {groups or 'none'}")


def _require_root_unreachable() -> None:
    for name, attempt in (("setuid(0)", lambda: os.setuid(0)), ("seteuid(0)", lambda: os.seteuid(0)),
                          ("setgid(0)", lambda: os.setgid(0)), ("setegid(0)", lambda: os.setegid(0)),
                          ("setgroups([0])", lambda: os.setgroups([0]))):
        try:
            attempt()
        except PermissionError:
            continue
        raise PrivilegeError(f"privilege step 'regain root' failed: {name} succeeded after the drop")


def _lock_down() -> None:
    """No-new-privs, non-dumpable, cwd /: the end of both the root and the unprivileged path."""
    prctl = capabilities.prctl()
    step("set no-new-privs", prctl.set_no_new_privs, 1)
    require_status("set no-new-privs", "NoNewPrivs", "1")
    step("make non-dumpable", prctl.set_dumpable, False)
    if prctl.get_dumpable():
        raise PrivilegeError("privilege step 'make non-dumpable' did not take effect")
    step("chdir /", os.chdir, "/")


def drop_privileges(user: str, groups: Sequence[str] = ()) -> None:
    """Become `user` (keeping the named supplementary `groups`) for good, with no
    capability left, or raise PrivilegeError."""
    entry = _resolve(user)
    uid, gid = entry.pw_uid, entry.pw_gid
    gids = _resolve_groups(groups)
    if os.geteuid() != 0:
        raise PrivilegeError(f"privilege step 'drop to {user}' failed: the process is not root "
                             f"(euid {os.geteuid()}); start it as root, or use --unprivileged")
    require_single_thread()
    capabilities.empty_bounding_set()
    step("setgroups", os.setgroups, gids)
    step("setresgid", os.setresgid, gid, gid, gid)
    step("setresuid", os.setresuid, uid, uid, uid)
    _require_ids(uid, gid, gids)
    _require_root_unreachable()
    capabilities.empty_sets()
    capabilities.verify_empty()
    _lock_down()


def restrict_unprivileged() -> None:
    """For --unprivileged: refuse root, shed any capabilities, set no-new-privs, non-dumpable."""
    if 0 in os.getresuid():
        raise PrivilegeError(f"privilege step 'unprivileged start' failed: uids {os.getresuid()}; "
                             "--unprivileged must not run as root (without it, root drops privileges)")
    require_single_thread()
    capabilities.empty_sets()
    capabilities.verify_empty(bounding=False)
    _lock_down()
