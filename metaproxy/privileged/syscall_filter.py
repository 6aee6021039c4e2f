"""The seccomp allow-list: the system calls the relay makes, and nothing else.

Read off strace of the daemon relaying in the test lab (CPython 3.11, asyncio,
splice, journald, sd_notify), grouped by purpose as in chrony's sys_linux.c
and Tor's sandbox.c. Any other call gets the action: 'kill' (the process dies
with SIGSYS), 'trap' (SIGSYS to the thread, to debug), 'log' (allowed and
logged by the kernel), or 'off' (no filter; the caller warns loudly).

Landlock (landlock.py) is applied before this filter, which allows none of its
calls and no prctl(): neither can be loosened or re-stacked afterwards.

A rule is a name, allowed with any arguments, or (name, conditions), allowed
when every condition (index, mask, value) holds: args[index] & mask == value.
EQ compares the low 32 bits, all the kernel reads of an int argument.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import socket
import termios
from typing import Any

from metaproxy.errors import PrivilegeError
from metaproxy.privileged.steps import require_module, require_status

Condition = tuple[int, int, int]
Rule = str | tuple[str, tuple[Condition, ...]]
EQ = 0xFFFF_FFFF
SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>; IP6T_SO_ORIGINAL_DST is 80 too
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>
CLONE_THREAD = 0x10000
SOCK_TYPE_MASK = 0xF  # SOCK_NONBLOCK and SOCK_CLOEXEC are flags above the type
NETLINK_SOCK_DIAG = 4  # <linux/netlink.h>
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1  # <linux/prctl.h>, Linux >= 6.3
WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND, os.O_TMPFILE & ~os.O_DIRECTORY)


def _if(name: str, *conditions: Condition) -> Rule:
    return (name, conditions)


def _socket(family: int, kind: int, protocol: int) -> Rule:
    """socket(family, kind | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol), nothing else."""
    return _if("socket", (0, EQ, family), (1, SOCK_TYPE_MASK, kind), (2, EQ, protocol))


def _options(name: str, *pairs: tuple[int, int]) -> tuple[Rule, ...]:
    return tuple(_if(name, (1, EQ, level), (2, EQ, option)) for level, option in pairs)


ALLOWED: tuple[tuple[str, tuple[Rule, ...]], ...] = (
    # Memory: the allocator, thread stacks, extension modules mapped by a late import.
    # W^X, as systemd's MemoryDenyWriteExecute: mmap() never writable and executable
    # at once, and mprotect() never adds PROT_EXEC (write, then make it executable).
    ("memory", ("brk", "munmap", "mremap", "madvise", _if("mmap", (2, mmap.PROT_EXEC, 0)),
                _if("mmap", (2, mmap.PROT_WRITE, 0)), _if("mprotect", (2, mmap.PROT_EXEC, 0)))),
    # Threads of asyncio's default executor: clone() only with CLONE_THREAD, so
    # never a fork. clone3() hides its flags from the filter: see DENIED_SOFTLY.
    # Python 3.13 (Debian 13) sizes the executor from our own CPU mask (pid 0).
    ("threads", (_if("clone", (0, CLONE_THREAD, CLONE_THREAD)), "futex", "set_robust_list", "rseq",
                 "gettid", "exit", "exit_group", _if("sched_getaffinity", (0, EQ, 0)))),
    # Signals arrive through asyncio's handlers; the daemon sends none (no kill).
    ("signals", ("rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "restart_syscall")),
    # Clocks (when the vDSO falls back) and getrandom() for isolation credentials.
    ("time and randomness", ("clock_gettime", "clock_nanosleep", "getrandom")),
    # Our own ids, and our own file limit (prlimit64 on pid 0 only).
    ("identity", ("getpid", "getuid", "geteuid", "getgid", "getegid", _if("prlimit64", (0, EQ, 0)))),
    # Files, read-only: the config on SIGHUP, late imports (Landlock narrows where
    # from). Opening to write is answered EACCES (DENIED_SOFTLY).
    # fstat(): glibc 2.41 (Debian 13) calls it where 2.36 called newfstatat(fd, "").
    ("reading files", (_if("openat", (2, sum(WRITE_FLAGS), 0)), "read", "lseek", "newfstatat",
                       "fstat", "getdents64", "close")),
    # Logging and systemd: lines on stderr; journald and sd_notify datagrams
    # (libsystemd's sd_notify opens a fresh AF_UNIX datagram socket per message).
    ("logging", ("write", "sendmsg", _socket(socket.AF_UNIX, socket.SOCK_DGRAM, 0))),
    # Non-blocking mode (FIONBIO is CPython's setblocking), isatty() (TCGETS),
    # and pipe sizes. No other fcntl or ioctl: none of TIOCSTI and its kin.
    ("descriptors", tuple(_if("fcntl", (1, EQ, cmd)) for cmd in (
        fcntl.F_GETFL, fcntl.F_SETFL, fcntl.F_GETPIPE_SZ, fcntl.F_SETPIPE_SZ))
     + tuple(_if("ioctl", (1, EQ, request)) for request in (termios.FIONBIO, termios.TCGETS))),
    # The event loop, and splice() moving bytes socket -> pipe -> socket in the kernel.
    ("event loop and relaying", ("epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "pipe2",
                                 "splice")),
    # Sockets, each with its protocol checked: TCP over IPv4 and IPv6 to upstreams
    # (protocol 0 or IPPROTO_TCP, so never MPTCP or SCTP streams); AF_UNIX streams for
    # unix:/path upstreams and asyncio's self-pipe; netlink only as SOCK_RAW
    # NETLINK_SOCK_DIAG, one socket per isolation = user owner lookup. No UDP (so no
    # DNS lookup can leak), no other netlink, raw or packet sockets, no bind() or
    # listen(): the root phase made the listeners.
    ("sockets", tuple(_socket(family, socket.SOCK_STREAM, protocol)
                      for family in (socket.AF_INET, socket.AF_INET6) for protocol in (0, socket.IPPROTO_TCP))
     + (_socket(socket.AF_UNIX, socket.SOCK_STREAM, 0), _socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG),
        _if("socketpair", (0, EQ, socket.AF_UNIX), (2, EQ, 0)), "accept4", "connect", "getsockname",
        "getpeername", "shutdown", "sendto", "recvfrom")),
    # getsockopt: the original destination (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST),
    # the outcome of a non-blocking connect (SO_ERROR), and the send buffer
    # that libsystemd's sd_notify reads before it enlarges it.
    ("reading socket options", _options(
        "getsockopt", (socket.SOL_IP, SO_ORIGINAL_DST), (socket.IPPROTO_IPV6, SO_ORIGINAL_DST),
        (socket.SOL_SOCKET, socket.SO_ERROR), (socket.SOL_SOCKET, socket.SO_SNDBUF))),
    # setsockopt: TCP_NODELAY (asyncio sets it on TCP transports), SO_LINGER 0
    # to pass a reset on, and sd_notify's send buffer (FORCE fails unprivileged).
    ("setting socket options", _options(
        "setsockopt", (socket.IPPROTO_TCP, socket.TCP_NODELAY), (socket.SOL_SOCKET, socket.SO_LINGER),
        (socket.SOL_SOCKET, socket.SO_SNDBUF), (socket.SOL_SOCKET, SO_SNDBUFFORCE))),
)

# Refused with an errno rather than the action, because the caller copes:
DENIED_SOFTLY: tuple[tuple[int, tuple[Rule, ...]], ...] = (
    # pthread_create() then falls back to clone(), whose flags the filter sees.
    (errno.ENOSYS, ("clone3",)),
    # libsystemd falls back to a file (refused below): a journal record too big
    # for one datagram is lost, not fatal.
    (errno.ENOSYS, ("memfd_create",)),
    # The import system does without a bytecode cache it cannot write.
    (errno.EACCES, tuple(_if("openat", (2, bit, bit)) for bit in WRITE_FLAGS)),
)


def _add(flt: Any, action: Any, rule: Rule, seccomp: Any) -> None:
    name, conditions = (rule, ()) if isinstance(rule, str) else rule
    flt.add_rule(action, name, *(seccomp.Arg(i, seccomp.MASKED_EQ, m, v) for i, m, v in conditions))


def _deny_write_execute() -> None:
    """PR_SET_MDWE where the kernel has it (6.3+: Debian 13, not 12's 6.1), so W^X also
    holds for what the filter's arguments cannot see; elsewhere the memory rules alone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        if ctypes.get_errno() == errno.EINVAL:
            return
        raise PrivilegeError(f"privilege step 'set PR_SET_MDWE' failed: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) != PR_MDWE_REFUSE_EXEC_GAIN:
        raise PrivilegeError("privilege step 'set PR_SET_MDWE' did not take effect")


def load_syscall_filter(action: str) -> None:
    """Load the allow-list into every thread; 'off' loads nothing. Raises PrivilegeError."""
    if action not in ("kill", "trap", "log", "off"):
        raise PrivilegeError(f"unknown seccomp action {action!r}: expected kill, log, trap or off")
    if action == "off":
        return
    if (machine := os.uname().machine) != "x86_64":  # elsewhere a name missing there kills us unexplained
        raise PrivilegeError(f"privilege step 'load seccomp filter' failed: its allow-list names amd64 system calls, "
                             f"this machine is {machine}; run on amd64, or set seccomp = off in [daemon] (no filter)")
    _deny_write_execute()
    seccomp = require_module("seccomp", "python3-seccomp")
    default = {"kill": seccomp.KILL_PROCESS, "trap": seccomp.TRAP, "log": seccomp.LOG}[action]
    try:
        flt = seccomp.SyscallFilter(defaction=default)
        flt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)  # e.g. int 0x80, x32 calls
        flt.set_attr(seccomp.Attr.CTL_TSYNC, 1)  # all threads, not only the calling one
        for _purpose, rules in ALLOWED:
            for rule in rules:
                _add(flt, seccomp.ALLOW, rule, seccomp)
        for code, rules in DENIED_SOFTLY:
            for rule in rules:
                _add(flt, seccomp.ERRNO(code), rule, seccomp)
        flt.load()
    except (OSError, RuntimeError, ValueError) as exc:
        raise PrivilegeError(f"privilege step 'load seccomp filter' failed: {exc}") from exc
    require_status("load seccomp filter", "Seccomp", "2")
