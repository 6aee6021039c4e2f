"""Why a ``unix:`` upstream cannot be reached, in words: the socket's owner, group and mode.

Used by the daemon when a dial fails, and by ``-t`` in a child that has become
the service user. Why it is built this way:
 1. Each errno means one thing on a Unix socket: ENOENT, no socket at that
    path (the proxy is not running, or the path is wrong); ECONNREFUSED, a
    socket file with nothing listening (a proxy that stopped); EACCES or
    EPERM, the proxy may well be running but the service user may not open
    it. Only the first two ask whether the proxy runs.
 2. ``stat()`` needs no right that Landlock or the seccomp filter takes away
    (newfstatat is allowed), so the daemon can still describe the socket,
    and a directory on the way that it cannot search, after start.
 3. /etc/passwd and /etc/group are out of the sandbox after start, and NSS
    may load modules the filter would kill us for: names come from a table
    filled as root at start (``learn_names``), else the numeric id is shown.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Callable, Iterable

# ("user" | "group", id) -> name, filled before the sandbox (learn_names).
_NAMES: dict[tuple[str, int], str] = {}

Namer = Callable[[str, int], str | None]


def learn_names(paths: Iterable[str], groups: Iterable[str]) -> None:
    """As root, before the drop: the names of the configured groups and of the owners
    of each socket and its directories, for messages made inside the sandbox."""
    for name in groups:
        try:
            _NAMES[("group", grp.getgrnam(name).gr_gid)] = name
        except KeyError:
            continue
    for path in paths:
        for part in _ancestry(path):
            try:
                st = os.stat(part)
            except OSError:
                continue
            _NAMES.update({("user", st.st_uid): n for n in [_lookup("user", st.st_uid)] if n})
            _NAMES.update({("group", st.st_gid): n for n in [_lookup("group", st.st_gid)] if n})


def _lookup(kind: str, number: int) -> str | None:
    try:
        return pwd.getpwuid(number).pw_name if kind == "user" else grp.getgrgid(number).gr_name
    except KeyError:
        return None


def learned(kind: str, number: int) -> str | None:
    return _NAMES.get((kind, number))


def explain(err: int, path: str, names: Namer = learned) -> str:
    """What to tell the admin after connect() to the socket at ``path`` failed with ``err``."""
    if err == errno.ENOENT:
        return "no socket exists at that path: is the proxy (tor) running, and is its SocksPort this path?"
    if err == errno.ECONNREFUSED:
        return "the socket file exists but nothing listens on it: the proxy that made it has stopped; start it"
    if err in (errno.EACCES, errno.EPERM):
        return _denied(path, names)
    return "check the path and the proxy"


def _denied(path: str, names: Namer) -> str:
    """The service user may not connect: which file or directory says no, and the remedy."""
    blocked, parent = path, None
    try:
        st = os.stat(path)
    except OSError:
        # A directory on the way cannot be searched: the deepest one we can stat says no.
        parent = next((p for p in _ancestry(path)[1:] if _stat(p) is not None), "/")
        st = os.stat(parent)
        blocked = parent
    who = f"owned by {_name(names, 'user', st.st_uid)}, group {_name(names, 'group', st.st_gid)}, " \
          f"mode {stat.filemode(st.st_mode)} ({stat.S_IMODE(st.st_mode):04o})"
    group = names("group", st.st_gid) or f"<the name of gid {st.st_gid}>"
    if st.st_gid == 0:  # root's group is never kept
        return (f"the service user may not reach {blocked} ({who}); use a socket in a directory it can "
                "reach, such as Debian's /run/tor/socks (WorldWritable), or a GroupWritable one with "
                "[daemon] groups")
    if parent is not None:
        return (f"the service user may not search the directory {blocked} ({who}); if the group may "
                f"(g+x), keep it with [daemon] groups = {group}, or use a socket in a directory it can "
                "reach, such as Debian's /run/tor/socks")
    if st.st_mode & stat.S_IWGRP:
        return (f"the service user may not connect: the socket is {who}; keep its group through the "
                f"drop with [daemon] groups = {group} and restart")
    return (f"the service user may not connect: the socket is {who}; make the SocksPort GroupWritable "
            f"and set [daemon] groups = {group}, or WorldWritable")


def _name(names: Namer, kind: str, number: int) -> str:
    name = names(kind, number)
    return f"{name} ({'uid' if kind == 'user' else 'gid'} {number})" if name else \
        f"{'uid' if kind == 'user' else 'gid'} {number}"


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _ancestry(path: str) -> list[str]:
    """The path, then each directory above it up to /: deepest first."""
    out = [path]
    while (up := os.path.dirname(out[-1])) != out[-1]:
        out.append(up)
    return out
