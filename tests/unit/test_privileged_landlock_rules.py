"""restrict_access() (Landlock), each in a forked child (root only), alone and with the
whole sandbox: the drop to nobody, Landlock, then the seccomp filter in kill mode.

Each test shows one hole closed: a TCP connect to a port that is not an
upstream's, an abstract Unix socket, a file outside the allowed tree, an MPTCP socket,
a W+X mapping. Where the kernel's ABI is too old for a right, the test skips and says
which ABI it saw; the forced-ABI tests show how the ruleset degrades.
"""

from __future__ import annotations

import errno
import importlib
import mmap
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from metaproxy.privileged import drop_privileges, load_syscall_filter, restrict_access
from metaproxy.privileged.landlock_rules import RIGHTS, kernel_abi
from tests.unit.forked import in_child

ABI = kernel_abi()
ABSTRACT = f"\0metaproxy-test-abstract-{os.getpid()}"  # bound by the test process, outside the sandbox
IPPROTO_MPTCP = 262


def _need(abi: int, what: str) -> None:
    if ABI < abi:
        pytest.skip(f"this kernel's Landlock ABI is {ABI}; {what} needs ABI {abi} or later")


def _errno(call: Callable[[], object]) -> str:
    try:
        call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


@pytest.fixture
def tree() -> Iterator[Path]:
    """An allowed tree (world-readable, for nobody) with a file, and a file outside it."""
    top = Path(tempfile.mkdtemp(prefix="metaproxy-landlock."))
    try:
        (top / "allowed").mkdir()
        (top / "allowed" / "module.py").write_text("x = 1\n")
        (top / "outside.txt").write_text("secret\n")
        for path in (top, top / "allowed"):
            path.chmod(0o755)
        yield top
    finally:
        for path in (top / "allowed" / "module.py", top / "outside.txt"):
            path.unlink()
        (top / "allowed").rmdir()
        top.rmdir()


def _listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def _connect(address: tuple[str, int]) -> None:
    """A plain connect(): create_connection() would import the idna codec, a file read."""
    with socket.socket() as s:
        s.connect(address)


def test_files_only_read_beneath_the_allowed_paths(tree: Path) -> None:
    """Beneath an allowed directory files and listings read; outside it, and any write or
    create even inside it, fail with EACCES (Landlock alone, without the seccomp filter)."""
    _need(1, "file rules")
    def body() -> dict[str, str]:
        restrict_access([str(tree / "allowed")], [])
        return {"read inside": _errno(lambda: open(tree / "allowed" / "module.py").read()),
                "list inside": _errno(lambda: os.listdir(tree / "allowed")),
                "read outside": _errno(lambda: open(tree / "outside.txt").read()),
                "read /etc/passwd": _errno(lambda: open("/etc/passwd").read()),
                "write inside": _errno(lambda: open(tree / "allowed" / "module.py", "a")),
                "create inside": _errno(lambda: open(tree / "allowed" / "new.py", "x"))}
    outcome = in_child(body)
    assert outcome.ok, outcome
    assert outcome.value == {"read inside": "ok", "list inside": "ok", "read outside": "EACCES",
                             "read /etc/passwd": "EACCES", "write inside": "EACCES",
                             "create inside": "EACCES"}, outcome


def test_a_single_file_rule_allows_that_file_only(tree: Path) -> None:
    """A file (the config) may be named: it reads, its neighbours do not."""
    _need(1, "file rules")
    def body() -> list[str]:
        restrict_access([str(tree / "outside.txt")], [])
        return [_errno(lambda: open(tree / "outside.txt").read()),
                _errno(lambda: open(tree / "allowed" / "module.py").read())]
    outcome = in_child(body)
    assert outcome.ok and outcome.value == ["ok", "EACCES"], outcome


def test_tcp_connect_only_to_upstream_ports_and_no_bind() -> None:
    """connect() reaches a listener on an allowed (upstream) port; a port that is not an
    upstream's (a Tor ControlPort, say) gets EACCES before a packet is sent; bind() of any
    TCP port gets EACCES."""
    _need(4, "TCP connect and bind rules")
    upstream, other = _listener(), _listener()
    try:
        def body() -> dict[str, str]:
            restrict_access([], [upstream.getsockname()[1]])
            return {"upstream": _errno(lambda: _connect(upstream.getsockname())),
                    "other": _errno(lambda: _connect(other.getsockname())),
                    "bind": _errno(lambda: socket.socket().bind(("127.0.0.1", 0)))}
        outcome = in_child(body)
    finally:
        upstream.close()
        other.close()
    assert outcome.ok and outcome.value == {"upstream": "ok", "other": "EACCES", "bind": "EACCES"}, outcome


def test_abstract_unix_sockets_and_signals_outside_are_out_of_reach() -> None:
    """An abstract Unix socket bound by another process cannot be connected to (EPERM),
    and no signal reaches a process outside the sandbox (EPERM), not even its parent."""
    _need(6, "scoping of abstract Unix sockets and signals")
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outside.bind(ABSTRACT)
    outside.listen()
    parent = os.getpid()
    try:
        def body() -> dict[str, str]:
            restrict_access([], [])
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            return {"abstract": _errno(lambda: client.connect(outside.getsockname())),
                    "signal": _errno(lambda: os.kill(parent, 0))}
        outcome = in_child(body)
    finally:
        outside.close()
    assert outcome.ok and outcome.value == {"abstract": "EPERM", "signal": "EPERM"}, outcome


def test_the_report_names_the_abi_and_what_stays_unrestricted() -> None:
    """On this kernel the report gives the ABI used and the kernel's; a named Unix socket
    is always listed as reachable, since no Landlock right covers connecting to one."""
    def body() -> list[Any]:
        found = restrict_access([], [])
        return [found.abi, found.kernel_abi, list(found.unrestricted)]
    outcome = in_child(body)
    assert outcome.ok, outcome
    abi, kernel, unrestricted = outcome.value
    assert kernel == ABI and abi == min(ABI, 6), outcome
    assert unrestricted[-1].startswith("connect to named Unix sockets"), unrestricted
    if ABI >= 6:
        assert len(unrestricted) == 1, unrestricted


@pytest.mark.parametrize("limit", [3, 5])
def test_a_lower_abi_degrades_as_documented(tree: Path, limit: int) -> None:
    """Forced to ABI 3 (Debian 12's kernel), files are still confined but TCP and abstract
    sockets are not, and the report says so; forced to ABI 5, TCP is confined and only the
    scoping of ABI 6 is reported missing."""
    _need(limit, f"forcing ABI {limit}")
    other = _listener()
    try:
        def body() -> dict[str, Any]:
            found = restrict_access([str(tree / "allowed")], [], abi_limit=limit)
            return {"abi": found.abi, "unrestricted": list(found.unrestricted),
                    "read outside": _errno(lambda: open(tree / "outside.txt").read()),
                    "connect": _errno(lambda: _connect(other.getsockname())),
                    "abstract": _errno(lambda: socket.socket(socket.AF_UNIX).connect("\0metaproxy-none"))}
        outcome = in_child(body)
    finally:
        other.close()
    assert outcome.ok, outcome
    kept = ["reach abstract Unix sockets", "signal other processes"]
    if limit == 3:
        assert outcome.value["connect"] == "ok", outcome
        kept = ["bind TCP ports", "connect to TCP ports", "ioctl on devices"] + kept
    else:
        assert outcome.value["connect"] == "EACCES", outcome
    assert outcome.value["abi"] == limit and outcome.value["read outside"] == "EACCES", outcome
    assert outcome.value["abstract"] == "ECONNREFUSED", outcome  # not scoped: the name is merely unbound
    assert outcome.value["unrestricted"][:-1] == kept, outcome


def test_without_landlock_nothing_is_restricted_and_everything_is_reported() -> None:
    """ABI 0 (a kernel without Landlock): nothing changes, and every right is reported."""
    def body() -> list[Any]:
        found = restrict_access([], [], abi_limit=0)
        return [found.abi, len(found.unrestricted), _errno(lambda: open("/etc/passwd").read())]
    outcome = in_child(body)
    assert outcome.ok and outcome.value == [0, len(RIGHTS) + 1, "ok"], outcome


@pytest.mark.parametrize("paths, message", [(["/"], "would allow every file"),
                                            (["/nonexistent-metaproxy"], "cannot open")])
def test_a_rule_that_would_void_the_sandbox_or_cannot_be_made_is_refused(paths: list[str],
                                                                          message: str) -> None:
    """'/' is refused rather than allowing every file; a missing path is an error, not skipped."""
    _need(1, "file rules")
    def body() -> str:
        try:
            restrict_access(paths, [])
        except PermissionError as exc:
            return str(exc)
        return "accepted"
    outcome = in_child(body)
    assert outcome.ok and message in outcome.value, outcome


def test_a_second_thread_is_refused() -> None:
    """Landlock restricts the calling thread only: with another thread running it refuses."""
    _need(1, "Landlock")
    def body() -> str:
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        try:
            restrict_access([], [])
        except PermissionError as exc:
            return str(exc)
        finally:
            stop.set()
            thread.join()
        return "accepted"
    outcome = in_child(body)
    assert outcome.ok and "2 threads" in outcome.value, outcome


# ---- the whole sandbox: nobody, Landlock, seccomp kill ------------------------------------

def _contained(tree: Path, port: int) -> None:
    importlib.import_module("seccomp")  # the daemon's modules are beneath its allowed paths; these are not
    drop_privileges("nobody")
    restrict_access([str(tree / "allowed"), "/proc/self"], [port])  # the filter's proof reads status
    load_syscall_filter("kill")


HOLES: dict[str, tuple[int, str, Callable[[Path, int], object]]] = {
    "TCP connect to a port that is no upstream's": (4, "EACCES", lambda tree, port: _connect(
        ("127.0.0.1", 9051 if port != 9051 else 9052))),
    "connect to an abstract Unix socket": (6, "EPERM", lambda tree, port: socket.socket(socket.AF_UNIX).connect(
        ABSTRACT)),
    "open of a file outside the allowed tree": (1, "EACCES", lambda tree, port: open(tree / "outside.txt")),
}


@pytest.mark.parametrize("name", HOLES)
def test_a_contained_child_is_denied(tree: Path, name: str) -> None:
    """Dropped to nobody, under Landlock and the kill filter, the hole is closed with an
    errno (the child lives on), while its allowed counterpart still works."""
    abi, expected, attempt = HOLES[name]
    _need(abi, name)
    upstream = _listener()
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outside.bind(ABSTRACT)
    outside.listen()
    port = upstream.getsockname()[1]
    try:
        def body() -> list[str]:
            _contained(tree, port)
            return [_errno(lambda: attempt(tree, port)),
                    _errno(lambda: _connect(("127.0.0.1", port))),
                    _errno(lambda: open(tree / "allowed" / "module.py").read())]
        outcome = in_child(body)
    finally:
        upstream.close()
        outside.close()
    assert outcome.ok and outcome.value == [expected, "ok", "ok"], outcome


@pytest.mark.parametrize("name, attempt", [
    ("MPTCP socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)),
    ("W+X mapping", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),
])
def test_a_contained_child_is_killed(tree: Path, name: str, attempt: Callable[[], object]) -> None:
    """Under the whole sandbox an MPTCP socket or a W+X mapping ends the child with SIGSYS."""
    upstream = _listener()
    try:
        def body() -> str:
            _contained(tree, upstream.getsockname()[1])
            attempt()
            return "survived"
        outcome = in_child(body)
    finally:
        upstream.close()
    assert outcome.signal == signal.SIGSYS, (name, outcome)
