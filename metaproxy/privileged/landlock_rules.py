"""Landlock: what a compromised daemon may still read, connect to and reach.

Three system calls and the structs of <linux/landlock.h>, through ctypes (no
Debian package wraps them for Python). Why it is done this way:
 1. Best effort by ABI: the ruleset handles every right the kernel knows, up to
    ABI 6, and the caller logs the rest. ABI 1-3 (Debian 12's 6.1): files;
    4: TCP bind and connect by port; 5: device ioctls; 6 (Debian 13's 6.12):
    abstract Unix sockets and signals scoped to the daemon. ABI 7 adds only
    audit flags.
 2. After the drop, which sets no-new-privs (the kernel requires it), and
    before the seccomp filter, which allows none of these calls: the ruleset
    can then be neither loosened nor stacked again.
 3. One thread only: landlock_restrict_self() restricts the calling thread.
 4. A rule holds the inode, not the name: a config file replaced by rename is
    another file, and the daemon's reload says to restart.
 5. connect() to a named AF_UNIX socket is no access right up to ABI 7: such
    sockets stay reachable (file permissions still apply); said in the report.
 6. Proof read back, as for the drop: a directory outside the rules, a TCP
    bind and an abstract datagram must each be refused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from metaproxy.errors import PrivilegeError
from metaproxy.privileged.steps import require_single_thread

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # one table for all arches but alpha
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
FS_READ_FILE, FS_READ_DIR = 1 << 2, 1 << 3
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
KNOWN_ABI = 6
# (ABI, kind, bit, name) for every right handled: anything not allowed by a rule is denied.
RIGHTS = (
    *((1, "fs", 1 << bit, name) for bit, name in enumerate((
        "execute", "write files", "read files", "read directories", "remove directories",
        "remove files", "make character devices", "make directories", "make files",
        "make sockets", "make FIFOs", "make block devices", "make symlinks"))),
    (2, "fs", 1 << 13, "link or rename across directories"), (3, "fs", 1 << 14, "truncate files"),
    (4, "net", NET_BIND_TCP, "bind TCP ports"), (4, "net", NET_CONNECT_TCP, "connect to TCP ports"),
    (5, "fs", 1 << 15, "ioctl on devices"),
    (6, "scoped", SCOPE_ABSTRACT_UNIX_SOCKET, "reach abstract Unix sockets"),
    (6, "scoped", SCOPE_SIGNAL, "signal other processes"),
)
ALWAYS_KEPT = ("connect to named Unix sockets (no Landlock right up to ABI 7)",)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # packed in the kernel's header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


@dataclass(frozen=True, slots=True)
class Contained:
    """What the kernel enforces now: the ABI used (of the kernel's), and the rights it could not restrict."""

    abi: int
    kernel_abi: int
    unrestricted: tuple[str, ...]


def _syscall(name: str, number: int, *args: object) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        code = ctypes.get_errno()
        raise PrivilegeError(f"privilege step 'landlock {name}' failed: {os.strerror(code)} "
                             f"(errno {code} {errno.errorcode.get(code, '?')})")
    return int(result)


def kernel_abi() -> int:
    """The kernel's Landlock ABI, or 0 where it is missing or disabled at boot."""
    try:
        return _syscall("version", SYS_CREATE_RULESET, None, ctypes.c_size_t(0), CREATE_RULESET_VERSION)
    except PrivilegeError:
        return 0


def _handled(abi: int, kind: str) -> int:
    return sum(bit for level, k, bit, _ in RIGHTS if k == kind and level <= abi)


def _add_paths(ruleset: int, paths: Sequence[str]) -> None:
    for path in paths:
        if os.path.realpath(path) == "/":
            raise PrivilegeError("privilege step 'landlock rules' refused '/': it would allow every file")
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise PrivilegeError(f"privilege step 'landlock rules' cannot open {path!r}: {exc.strerror}") from exc
        try:  # a directory right on a file is EINVAL
            rights = FS_READ_FILE | (FS_READ_DIR if stat.S_ISDIR(os.fstat(fd).st_mode) else 0)
            rule = _PathBeneathAttr(rights, fd)
            _syscall(f"add {path}", SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), 0)
        finally:
            os.close(fd)


def _add_ports(ruleset: int, ports: Collection[int]) -> None:
    for port in sorted(set(ports)):
        rule = _NetPortAttr(NET_CONNECT_TCP, port)
        _syscall(f"add TCP port {port}", SYS_ADD_RULE, ruleset, RULE_NET_PORT, ctypes.byref(rule), 0)


def _refused(name: str, attempt: object) -> None:
    try:
        attempt()  # type: ignore[operator]
    except PermissionError:
        return
    raise PrivilegeError(f"privilege step 'landlock' did not take effect: {name} succeeded")


def _prove(abi: int, probe: socket.socket | None) -> None:
    _refused("opening / as a directory", lambda: os.close(os.open("/", os.O_RDONLY | os.O_DIRECTORY)))
    if abi >= 4:
        with socket.socket() as s:
            _refused("bind() of a TCP port", lambda: s.bind(("0.0.0.0", 0)))
    if probe is not None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            _refused("a datagram to an abstract socket", lambda: s.sendto(b"", probe.getsockname()))


def restrict_access(read_paths: Sequence[str], connect_ports: Collection[int], *,
                    abi_limit: int = KNOWN_ABI) -> Contained:
    """Allow reading only `read_paths`, TCP connect only to `connect_ports`, nothing else
    that the kernel's Landlock (at most `abi_limit`) can deny. Raises PrivilegeError."""
    kernel = kernel_abi()
    abi = min(kernel, abi_limit, KNOWN_ABI)
    unrestricted = tuple(name for level, _, _, name in RIGHTS if level > abi) + ALWAYS_KEPT
    if abi <= 0:
        return Contained(0, kernel, unrestricted)
    require_single_thread()
    attr = _RulesetAttr(_handled(abi, "fs"), _handled(abi, "net"), _handled(abi, "scoped"))
    size = 8 * (1 if abi < 4 else 2 if abi < 6 else 3)  # the struct as this ABI knows it
    ruleset = _syscall("create ruleset", SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    probe = None
    try:
        _add_paths(ruleset, read_paths)
        if abi >= 4:
            _add_ports(ruleset, connect_ports)
        if abi >= 6:  # bound before the restriction, so outside the new domain
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            probe.bind(f"\0metaproxy-landlock-probe-{os.getpid()}")
        _syscall("restrict self", SYS_RESTRICT_SELF, ruleset, 0)
        _prove(abi, probe)
    finally:
        os.close(ruleset)
        if probe is not None:
            probe.close()
    return Contained(abi, kernel, unrestricted)
