"""Unmodified client programs (curl, wget) and raw sockets, run in the client namespace.

No proxy option and no proxy variable is ever given: the REDIRECT rules alone
send the connection to the daemon.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass

from tests.system.lab import Namespace, clean_env, url_host

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


@dataclass(frozen=True)
class Fetched:
    code: int
    body: bytes
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.code == 0


def url(address: str, port: int, path: str = "/") -> str:
    return f"http://{url_host(address)}:{port}{path}"


def curl(ns: Namespace, target: str, *, as_nobody: bool = False, out: str | None = None,
         timeout: float = 20) -> Fetched:
    argv = ["curl", "-q", "--silent", "--show-error", "--fail", "--max-time", str(int(timeout)),
            "--output", out or "-", target]
    return _fetch(ns, argv, as_nobody, timeout)


def wget(ns: Namespace, target: str, *, as_nobody: bool = False, out: str | None = None,
         timeout: float = 20) -> Fetched:
    argv = ["wget", "--no-config", "--quiet", "--tries=1", f"--timeout={int(timeout)}",
            "--output-document", out or "-", target]
    return _fetch(ns, argv, as_nobody, timeout)


def _fetch(ns: Namespace, argv: list[str], as_nobody: bool, timeout: float) -> Fetched:
    if as_nobody:
        argv = AS_NOBODY + argv
    start = time.monotonic()
    try:
        proc = ns.run(argv, check=False, timeout=timeout + 5, env=clean_env(HOME="/"))
    except subprocess.TimeoutExpired:
        return Fetched(-1, b"", f"{argv[0]} still running after {timeout + 5}s", time.monotonic() - start)
    return Fetched(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"), time.monotonic() - start)


@dataclass(frozen=True)
class Outcome:
    """What a raw client saw: the reply, and whether and when it was reset."""
    data: bytes
    reset: bool
    seconds: float
    error: str = ""


def exchange(ns: Namespace, address: str, port: int, payload: bytes = b"", *,
             half_close: bool = False, timeout: float = 10) -> Outcome:
    """Connect from the client namespace, send payload, optionally shut down our write
    side, then read until EOF, reset or timeout. Time is measured from the connect."""
    start = time.monotonic()
    try:
        sock = ns.connect(address, port, timeout=timeout)
    except ConnectionResetError:
        # With a timeout set, connect() is non-blocking plus SO_ERROR: a reset that
        # the daemon sent right after accept() can already show up here.
        return Outcome(b"", True, time.monotonic() - start)
    try:
        sock.settimeout(timeout)
        chunks: list[bytes] = []
        try:
            if payload:
                sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        except ConnectionResetError:
            return Outcome(b"".join(chunks), True, time.monotonic() - start)
        except BrokenPipeError:
            return Outcome(b"".join(chunks), True, time.monotonic() - start)
        except socket.timeout:
            return Outcome(b"".join(chunks), False, time.monotonic() - start, "timeout")
        return Outcome(b"".join(chunks), False, time.monotonic() - start)
    finally:
        sock.close()
