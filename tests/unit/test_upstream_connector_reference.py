"""Our handshakes send what python-socks sends, byte for byte, except where we differ on purpose.

python-socks (Debian's python3-python-socks, 2.0.3 on bookworm, 2.7.1 on
trixie) is the reference implementation. Both clients run against the same
scripted upstream on loopback, which records every byte it receives and
answers with success; python-socks through its public synchronous API, ours
through the state machines driven by the real Dial. For the same inputs the
recorded requests must be identical. The two deliberate differences are
asserted as differences: HTTP CONNECT brackets an IPv6 authority (RFC 9110)
and sends no User-Agent.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Callable

import pytest

# The reference is a test dependency (.ci/apt-packages, Build-Depends <!nocheck>):
# missing, these tests fail; they never skip.
from python_socks import ProxyType
from python_socks.sync import Proxy

from metaproxy.config.model import InetAddress, Upstream, UpstreamType
from metaproxy.relay.poller import poller_for
from metaproxy.upstream.connector import Dial, handshake_for

Reader = Callable[[socket.socket], bytes]


def _exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _until(conn: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = conn.recv(1)
        if not chunk:
            raise EOFError
        data += chunk
        if len(data) > 4096:
            raise ValueError("runaway request")
    return data


def _socks5(conn: socket.socket) -> bytes:
    seen = _exactly(conn, 2)
    methods = _exactly(conn, seen[1])
    seen += methods
    if 2 in methods:
        conn.sendall(b"\x05\x02")
        head = _exactly(conn, 2)
        user = _exactly(conn, head[1])
        plen = _exactly(conn, 1)
        seen += head + user + plen + _exactly(conn, plen[0])
        conn.sendall(b"\x01\x00")
    else:
        conn.sendall(b"\x05\x00")
    head = _exactly(conn, 4)
    seen += head + _exactly(conn, {1: 4, 4: 16}[head[3]] + 2)
    conn.sendall(b"\x05\x00\x00\x01" + bytes([192, 0, 2, 2]) + b"\x04\x38")
    return seen


def _socks4(conn: socket.socket) -> bytes:
    seen = _exactly(conn, 8) + _until(conn, b"\0")
    conn.sendall(b"\x00\x5a" + bytes(6))
    return seen


def _http(conn: socket.socket) -> bytes:
    seen = _until(conn, b"\r\n\r\n")
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    return seen


class Recorder:
    """A scripted upstream on loopback that records one request per connection."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.port = self.listener.getsockname()[1]
        self.seen: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for _ in range(2):  # python-socks once, ours once
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.seen.append(self.reader(conn))
                    conn.recv(1)  # hold the tunnel open until the client closes
                except (OSError, EOFError, ValueError) as e:
                    self.seen.append(repr(e).encode())

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def _reference(kind: ProxyType, port: int, dest: tuple[str, int], username: str | None,
               password: str | None, rdns: bool | None = None) -> None:
    proxy = Proxy.create(kind, "127.0.0.1", port, username=username, password=password, rdns=rdns)
    sock = proxy.connect(dest[0], dest[1], timeout=5)
    sock.close()


def _ours(upstream: Upstream, dest: tuple[str, int], isolation: tuple[str, str] | None = None) -> bytes:
    async def dial() -> bytes:
        loop = asyncio.get_running_loop()
        poller = poller_for(loop)
        done: asyncio.Future[bytes] = loop.create_future()

        def finished(sock: socket.socket | None, early: bytes, error: Exception | None) -> None:
            if sock is not None:
                sock.close()
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(early)
        try:
            Dial(poller, loop.call_later, upstream, handshake_for(upstream, *dest, isolation), finished)
            return await asyncio.wait_for(done, 5)
        finally:
            poller.close()
    return asyncio.run(dial())


def _pair(reader: Reader, kind: ProxyType, ours: UpstreamType, dest: tuple[str, int], username: str = "",
          password: str = "", isolation: tuple[str, str] | None = None,
          rdns: bool | None = None) -> tuple[bytes, bytes]:
    recorder = Recorder(reader)
    try:
        ref_user, ref_pass = (username, password) if username else (isolation or (None, None))
        _reference(kind, recorder.port, dest, ref_user or None, ref_pass or None, rdns)
        upstream = Upstream(name="ref", type=ours, address=InetAddress("127.0.0.1", recorder.port),
                            username=username, password=password, connect_timeout=5)
        _ours(upstream, dest, isolation)
    finally:
        recorder.close()
    assert len(recorder.seen) == 2, recorder.seen
    return recorder.seen[0], recorder.seen[1]


DESTS = [("198.51.100.2", 80), ("203.0.113.7", 65535), ("2001:db8:2::2", 443)]


@pytest.mark.parametrize("dest", DESTS)
@pytest.mark.parametrize("username, password", [("", ""), ("alice", "s3cret"), ("u" * 255, "p" * 255)])
def test_socks5_requests_match_python_socks(dest: tuple[str, int], username: str, password: str) -> None:
    reference, ours = _pair(_socks5, ProxyType.SOCKS5, UpstreamType.SOCKS5, dest, username, password)
    assert ours == reference


def test_socks5_isolation_credentials_go_out_as_rfc1929() -> None:
    isolation = ("mp-" + "a" * 32, "a" * 32)
    reference, ours = _pair(_socks5, ProxyType.SOCKS5, UpstreamType.SOCKS5, DESTS[0], isolation=isolation)
    assert ours == reference
    assert ours.startswith(b"\x05\x02\x00\x02\x01\x23mp-")


@pytest.mark.parametrize("kind", [UpstreamType.SOCKS4, UpstreamType.SOCKS4A])
@pytest.mark.parametrize("username", ["", "alice"])
def test_socks4_requests_match_python_socks(kind: UpstreamType, username: str) -> None:
    reference, ours = _pair(_socks4, ProxyType.SOCKS4, kind, DESTS[0], username,
                            rdns=kind is UpstreamType.SOCKS4A)
    assert ours == reference


def _without_user_agent(request: bytes) -> bytes:
    return b"".join(line for line in request.splitlines(keepends=True) if not line.startswith(b"User-Agent:"))


@pytest.mark.parametrize("username, password", [("", ""), ("alice", "s3cret")])
def test_http_requests_match_python_socks_but_for_the_user_agent(username: str, password: str) -> None:
    reference, ours = _pair(_http, ProxyType.HTTP, UpstreamType.HTTP, DESTS[0], username, password)
    assert b"User-Agent:" in reference and b"User-Agent:" not in ours
    assert ours == _without_user_agent(reference)


def test_http_ipv6_authority_is_bracketed() -> None:
    """RFC 9110 authority-form; python-socks (2.0.3 at least) sends the bare literal."""
    reference, ours = _pair(_http, ProxyType.HTTP, UpstreamType.HTTP, ("2001:db8:2::2", 443))
    assert ours.startswith(b"CONNECT [2001:db8:2::2]:443 HTTP/1.1\r\nHost: [2001:db8:2::2]:443\r\n")
    bracketed = reference.replace(b" 2001:db8:2::2:443", b" [2001:db8:2::2]:443")
    assert ours == _without_user_agent(bracketed)
