"""What ``-t`` checks against this system, beyond the file itself.

The loader checks the text; these check what the daemon will meet at start,
each reported with file:line:
 1. Every [daemon] groups name exists (the drop would refuse otherwise). The
    loader cannot: a reload runs in the sandbox, where /etc/group is out of
    reach.
 2. Every ``unix:`` upstream can be opened by the service user with its
    groups. Run as root, -t forks a child that drops exactly as the daemon
    does (metaproxy.privileged) and tries a real connect() to each socket: no
    guessing from permission bits, ACLs and LSMs included. Run as another
    user, it tries as that user and says so.
    - EACCES/EPERM is an error: it will not change by itself, and the
      message names the owner, group and mode and the remedy.
    - No socket yet (ENOENT), or nothing listening (ECONNREFUSED), is a
      warning: Tor may start after us, or be restarting, and the daemon dials
      afresh for each connection. -t runs as ExecStartPre; it must not keep
      the service down because tor is.
    - A service user that does not exist (yet) is a warning too: the sockets
      go unchecked, and the daemon itself would refuse to start.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import select
import signal
import socket
from dataclasses import dataclass, field

from metaproxy.config import Config
from metaproxy.config.model import UnixAddress
from metaproxy.errors import MetaproxyError
from metaproxy.upstream import unix_access

CHILD_TIMEOUT = 10.0
_LISTENING = (0, errno.EAGAIN, errno.EINPROGRESS)  # EAGAIN: a full backlog is a live listener


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_system(config: Config) -> Findings:
    found = Findings()
    groups_at = config.where(("daemon",), "groups")
    for name in config.daemon.groups:
        try:
            if grp.getgrnam(name).gr_gid == 0:
                found.errors.append(f"{groups_at}: [daemon] groups: expected groups other than root's, "
                                    f"found {name!r} (gid 0)")
        except KeyError:
            found.errors.append(f"{groups_at}: [daemon] groups: expected existing groups, found no group "
                                f"{name!r} (install what creates it, e.g. tor for debian-tor)")
    sockets = {u.name: u.address.path for u in config.upstreams.values() if isinstance(u.address, UnixAddress)}
    if sockets and not found.errors:
        _check_sockets(config, sockets, found)
    return found


def _check_sockets(config: Config, sockets: dict[str, str], found: Findings) -> None:
    d = config.daemon
    if os.geteuid() == 0:
        who = f"{d.user}" + (f" with groups {', '.join(d.groups)}" if d.groups else " (no supplementary groups)")
    else:
        who = f"uid {os.geteuid()} (not root: not as the service user {d.user})"
    try:
        results = _in_child(d.user, d.groups, list(sockets.values()))
    except MetaproxyError as e:
        # Usually the service user does not exist yet (the package creates it): the daemon
        # would say so at start; the file itself is not wrong.
        found.warnings.append(f"{config.where(('daemon',), 'user')}: warning: the unix: sockets were not "
                              f"checked as {who}: {e}")
        return
    for name, path in sockets.items():
        err, why = results[path]
        at = f"{config.where(('upstreams', name), 'address')}: [upstreams][[{name}]] address: unix:{path}"
        if err in _LISTENING:
            found.notes.append(f"upstream {name}: unix:{path} accepts connections from {who}")
        elif err in (errno.ENOENT, errno.ECONNREFUSED):
            found.warnings.append(f"{at}: warning: {os.strerror(err)} (checked as {who}); {why}; the daemon "
                                  "tries again for each connection")
        else:
            found.errors.append(f"{at}: {os.strerror(err)} for {who}; {why}")


def _in_child(user: str, groups: tuple[str, ...], paths: list[str]) -> dict[str, tuple[int, str]]:
    """{path: (errno, explanation)} from a forked child that became the service user."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(read)
            os.write(write, json.dumps(_probe(user, groups, paths)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        data = _read_all(read, pid)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    answer = json.loads(data or b"{}")
    if "error" in answer or not answer:
        raise MetaproxyError(answer.get("error", "the checking child ended without an answer"))
    return {p: (int(e), w) for p, (e, w) in answer["results"].items()}


def _probe(user: str, groups: tuple[str, ...], paths: list[str]) -> dict[str, object]:
    if os.geteuid() == 0:
        from metaproxy import privileged
        try:
            privileged.drop_privileges(user, groups)
        except MetaproxyError as e:
            return {"error": str(e)}
    names = _system_names()
    results = {}
    for path in paths:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as s:
            err = s.connect_ex(path)
        results[path] = (err, "" if err in _LISTENING else unix_access.explain(err, path, names))
    return {"results": results}


def _system_names() -> unix_access.Namer:
    """Outside the sandbox, the passwd and group databases are readable."""
    import pwd

    def name(kind: str, number: int) -> str | None:
        try:
            return pwd.getpwuid(number).pw_name if kind == "user" else grp.getgrgid(number).gr_name
        except KeyError:
            return None
    return name


def _read_all(fd: int, pid: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([fd], [], [], CHILD_TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise MetaproxyError(f"the checking child gave no answer within {CHILD_TIMEOUT:g}s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
