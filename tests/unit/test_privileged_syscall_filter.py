"""load_syscall_filter(), each in a forked child (root only), so a kill takes only the child.

The forbidden calls end the child with SIGSYS in kill mode; the calls the relay
makes (asyncio, splice, pipes, the original-destination getsockopt, journald and
sd_notify datagrams, threads) keep working under the same filter.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import mmap
import os
import resource
import signal
import socket
import struct
import termios
import threading
from collections.abc import Callable
from typing import Any

import pytest

from metaproxy.errors import PrivilegeError
from metaproxy.kernel.peer_owner import client_uid
from metaproxy.privileged import load_syscall_filter
from metaproxy.protocol.inet_diag import NETLINK_SOCK_DIAG
from tests.unit.forked import in_child, proc_status

SO_ORIGINAL_DST = 80
IPPROTO_MPTCP = 262
PROT_WX = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)


def _with_socket(call: Callable[[socket.socket], object]) -> Callable[[], object]:
    return lambda: call(socket.socket())


def _make_executable() -> object:
    page = LIBC.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    return LIBC.mprotect(ctypes.c_void_p(page), 4096, mmap.PROT_READ | mmap.PROT_EXEC)


FORBIDDEN: dict[str, Callable[[], object]] = {
    "execve": lambda: os.execv("/bin/true", ["true"]),
    "fork (clone without CLONE_THREAD)": os.fork,
    "ptrace": lambda: LIBC.ptrace(0, 0, None, None),  # PTRACE_TRACEME
    "mount": lambda: LIBC.mount(b"none", b"/mnt", b"tmpfs", 0, None),
    "socket(AF_PACKET)": lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW),
    "socket(AF_NETLINK)": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW),
    "socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER): no other netlink protocol": lambda: socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW, 12),
    "socket(AF_NETLINK, SOCK_DGRAM, NETLINK_SOCK_DIAG): only SOCK_RAW": lambda: socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG),
    "socket(AF_INET, SOCK_DGRAM): no UDP": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
    "bind: no new listener": _with_socket(lambda s: s.bind(("127.0.0.1", 0))),
    "listen: not even on an unbound socket": _with_socket(lambda s: s.listen()),
    "getsockopt TCP_INFO: not in the list": _with_socket(
        lambda s: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)),
    "ioctl TIOCSTI": lambda: fcntl.ioctl(0, termios.TIOCSTI, b"x"),
    "socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP): only protocol 0 or TCP": lambda: socket.socket(
        socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP),
    "socket(AF_INET6, SOCK_STREAM, IPPROTO_SCTP)": lambda: socket.socket(
        socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_SCTP),
    "socket(AF_UNIX, SOCK_SEQPACKET): streams and datagrams only": lambda: socket.socket(
        socket.AF_UNIX, socket.SOCK_SEQPACKET),
    "mmap writable and executable": lambda: mmap.mmap(-1, 4096, prot=PROT_WX),
    "mprotect adding PROT_EXEC (write, then execute)": _make_executable,
    "landlock_create_ruleset: no second sandbox layer": lambda: LIBC.syscall(444, None, 0, 1),
    "setuid": lambda: os.setuid(0),
    "kill": lambda: os.kill(1, 0),
    "prctl: the drop cannot be undone": lambda: LIBC.prctl(4, 1, 0, 0, 0),  # PR_SET_DUMPABLE
}


@pytest.mark.parametrize("name", FORBIDDEN)
def test_forbidden_call_kills_the_process_with_sigsys(name: str) -> None:
    """In kill mode a call outside the allow-list ends the whole process with SIGSYS,
    and the call never runs."""
    call = FORBIDDEN[name]
    def body() -> str:
        load_syscall_filter("kill")
        call()
        return "survived"
    outcome = in_child(body)
    assert outcome.signal == signal.SIGSYS, (name, outcome)


def test_a_thread_started_before_the_filter_is_filtered_too() -> None:
    """The filter is synchronised to every thread (TSYNC), not only the caller's."""
    def body() -> str:
        go, seen = threading.Event(), []
        def worker() -> None:
            go.wait()
            seen.append(proc_status("/proc/thread-self/status")["Seccomp"])
            os.execv("/bin/true", ["true"])
        thread = threading.Thread(target=worker)
        thread.start()
        load_syscall_filter("kill")
        go.set()
        thread.join()
        return "survived"
    outcome = in_child(body)
    assert outcome.signal == signal.SIGSYS, outcome


def test_writing_opens_fail_with_eacces_and_reading_works() -> None:
    """Files open read-only (/proc/net/tcp, late imports); opening for writing or creating
    fails with EACCES rather than killing, since Python's bytecode cache tolerates it."""
    def body() -> dict[str, str]:
        load_syscall_filter("kill")
        results = {"read /proc/net/tcp": str(len(open("/proc/net/tcp", "rb").read()) > 0)}
        for mode in ("wb", "ab", "r+b", "xb"):
            try:
                open("/tmp/metaproxy-filter-test", mode)
                results[mode] = "opened"
            except OSError as exc:
                results[mode] = errno.errorcode[exc.errno or 0]
        return results
    outcome = in_child(body)
    assert outcome.ok, outcome
    assert outcome.value == {"read /proc/net/tcp": "True", "wb": "EACCES", "ab": "EACCES",
                             "r+b": "EACCES", "xb": "EACCES"}, outcome


def test_the_owner_lookup_of_isolation_user_works_under_the_filter() -> None:
    """The one netlink socket the filter allows (SOCK_RAW, NETLINK_SOCK_DIAG, non-blocking,
    close-on-exec) answers client_uid(): the owner of a live socket, then None once it is gone."""
    def body() -> list[int | None]:
        listener = socket.create_server(("127.0.0.1", 0))
        load_syscall_filter("kill")
        client = socket.create_connection(listener.getsockname())
        server, peer = listener.accept()
        found = [client_uid(peer, listener.getsockname())]
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        found.append(client_uid(peer, listener.getsockname()))
        server.close()
        return found
    outcome = in_child(body)
    assert outcome.ok and outcome.value == [os.geteuid(), None], outcome


def _relay_calls() -> dict[str, Any]:
    """What the relay does, after load_syscall_filter('kill'); returns what it saw."""
    seen: dict[str, Any] = {}
    listeners = {}
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        listeners[family] = socket.socket(family)
        listeners[family].bind((host, 0))
        listeners[family].listen()
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind("\0metaproxy-filter-test-%d" % os.getpid())
    load_syscall_filter("kill")
    seen["seccomp"] = proc_status()["Seccomp"]

    for family, listener in listeners.items():  # accept, the original destination, splice
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
        level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.SOL_IP
        try:
            server.getsockopt(level, SO_ORIGINAL_DST, 28)
        except OSError as exc:
            seen[f"SO_ORIGINAL_DST {family.name}"] = errno.errorcode[exc.errno or 0]
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(b"payload")
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 16)
        moved = os.splice(server.fileno(), w, 7)
        os.splice(r, server.fileno(), moved)
        seen[f"splice {family.name}"] = client.recv(7).decode()
        server.shutdown(socket.SHUT_WR)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for fd in (r, w):
            os.close(fd)
        for s in (server, client):
            s.close()

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:  # journald, sd_notify
        s.sendto(b"MESSAGE=hello\n", journal.getsockname())
    seen["journal"] = journal.recv(100).decode()
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()  # unix:/path upstreams
    socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()

    async def loop_work() -> str:  # asyncio streams, a thread, timers
        # Not asyncio.start_server(sock=...): it calls listen() again, which the filter forbids.
        loop, listener = asyncio.get_running_loop(), listeners[socket.AF_INET]
        listener.setblocking(False)
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        server, _ = await loop.sock_accept(listener)
        writer.write(b"ping\n")
        await loop.sock_sendall(server, await loop.sock_recv(server, 5))
        line = await reader.readline()
        writer.close()
        server.close()
        await asyncio.sleep(0.01)
        return line.decode().strip() + " " + str(await asyncio.to_thread(lambda: 42))
    seen["asyncio"] = asyncio.run(loop_work())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    seen["random"] = len(os.urandom(16))
    return seen


def test_the_calls_the_relay_makes_still_work_under_the_filter() -> None:
    """Under kill mode: accept, SO_ORIGINAL_DST answered ENOENT for an unredirected
    connection (not killed), splice through a pipe, journald-style datagrams, AF_UNIX
    and AF_INET6 sockets, asyncio with a worker thread, setrlimit and getrandom."""
    outcome = in_child(_relay_calls)
    assert outcome.ok, outcome
    assert outcome.value == {
        "seccomp": "2",
        "SO_ORIGINAL_DST AF_INET": "ENOENT", "splice AF_INET": "payload",
        "SO_ORIGINAL_DST AF_INET6": "ENOENT", "splice AF_INET6": "payload",
        "journal": "MESSAGE=hello\n", "asyncio": "ping 42", "random": 16}, outcome


def test_trap_mode_signals_the_thread_and_lets_a_handler_run() -> None:
    """In trap mode a forbidden call raises SIGSYS, which a handler can catch to debug;
    the process survives."""
    def body() -> int:
        caught: list[int] = []
        signal.signal(signal.SIGSYS, lambda signum, frame: caught.append(signum))
        load_syscall_filter("trap")
        os.getppid()  # not in the list
        return len(caught)
    outcome = in_child(body)
    assert outcome.ok and outcome.value == 1, outcome


def test_log_mode_lets_a_forbidden_call_through() -> None:
    """In log mode the filter is loaded, and a forbidden call runs (the kernel logs it)."""
    parent = os.getpid()
    def body() -> list[Any]:
        load_syscall_filter("log")
        return [proc_status()["Seccomp"], os.getppid() == parent]
    outcome = in_child(body)
    assert outcome.ok and outcome.value == ["2", True], outcome


def test_off_loads_no_filter() -> None:
    """'off' must be asked for by name, and then loads nothing (the daemon warns)."""
    def body() -> str:
        load_syscall_filter("off")
        return proc_status()["Seccomp"]
    outcome = in_child(body)
    assert outcome.ok and outcome.value == "0", outcome


def test_another_architecture_is_refused_with_the_remedy_not_killed_later() -> None:
    """The allow-list names amd64's calls; on arm64 (no epoll_wait) it would load and then
    kill the daemon at its first event-loop wait, with no word why."""
    def body() -> str:
        real = os.uname()
        arm64 = os.uname_result((real.sysname, real.nodename, real.release, real.version, "aarch64"))
        os.uname = lambda: arm64
        try:
            load_syscall_filter("kill")
        except PrivilegeError as exc:
            return f"{exc} | Seccomp: {proc_status()['Seccomp']}"
        return "loaded"
    outcome = in_child(body)
    assert outcome.ok, outcome
    assert "aarch64" in outcome.value and "seccomp = off" in outcome.value, outcome
    assert outcome.value.endswith("| Seccomp: 0"), outcome


def test_write_xor_execute_holds_even_where_the_filter_only_logs() -> None:
    """Readable-executable and writable mappings still work under kill mode. Where the
    kernel has PR_SET_MDWE (6.3+), a W+X mapping is refused by the kernel itself, so
    even in log mode it fails with EACCES; elsewhere log mode lets it through."""
    def body() -> dict[str, Any]:
        load_syscall_filter("log")
        mdwe = LIBC.prctl(66, 0, 0, 0, 0)  # PR_GET_MDWE
        try:
            mmap.mmap(-1, 4096, prot=PROT_WX).close()
            wx = "mapped"
        except OSError as exc:
            wx = errno.errorcode[exc.errno or 0]
        return {"mdwe": mdwe, "wx": wx}
    outcome = in_child(body)
    assert outcome.ok, outcome
    if outcome.value["mdwe"] < 0:
        assert outcome.value["wx"] == "mapped", outcome  # seccomp in log mode only
    else:
        assert outcome.value == {"mdwe": 1, "wx": "EACCES"}, outcome

    def allowed() -> list[int]:
        load_syscall_filter("kill")
        sizes = []
        for prot in (mmap.PROT_READ | mmap.PROT_WRITE, mmap.PROT_READ | mmap.PROT_EXEC, mmap.PROT_READ):
            with mmap.mmap(-1, 8192, prot=prot) as region:
                sizes.append(len(region))
        return sizes
    outcome = in_child(allowed)
    assert outcome.ok and outcome.value == [8192] * 3, outcome


@pytest.mark.parametrize("action", ["", "KILL", "allow", "errno"])
def test_unknown_action_is_refused(action: str) -> None:
    """Anything but kill, log, trap or off raises instead of picking a default."""
    with pytest.raises(PrivilegeError, match="expected kill, log, trap or off"):
        load_syscall_filter(action)
