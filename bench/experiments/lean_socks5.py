"""Experiment, for the bench only: a SOCKS5 handshake without python-socks.

    launch_project.py --experiment lean-socks5 ...

It measures what python-socks' layered coroutines cost per connection. The
handshake here is one small state machine driven by selector callbacks and a
single future: connect, greeting, (RFC 1929 auth), CONNECT, reply, in lock
step like python-socks (no pipelining: microsocks, for one, reads the
greeting with a recv() that would swallow a pipelined request). Payload that
follows the reply is handed on, as _FramedStream does. Other upstream types
use the real connector.

Not production code: errors carry short texts, and it has no unit tests.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

from metaproxy.config.model import Upstream, UpstreamType
from metaproxy.errors import UpstreamError, UpstreamProtocolError, UpstreamRefused, UpstreamTimeout
from metaproxy.upstream import connector

_real_open_upstream = connector.open_upstream


def _messages(dest_ip: str, dest_port: int, credentials: tuple[str, str] | None) -> tuple[bytes, bytes, bytes]:
    """(greeting, auth or b"", CONNECT request)."""
    if credentials:
        user, password = credentials[0].encode(), credentials[1].encode()
        greeting = b"\x05\x01\x02"
        auth = b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password
    else:
        greeting, auth = b"\x05\x01\x00", b""
    family = socket.AF_INET6 if ":" in dest_ip else socket.AF_INET
    atyp = b"\x04" if family == socket.AF_INET6 else b"\x01"
    request = b"\x05\x01\x00" + atyp + socket.inet_pton(family, dest_ip) + dest_port.to_bytes(2, "big")
    return greeting, auth, request


class _Handshake:
    __slots__ = ("loop", "sock", "fd", "stage", "auth", "request", "buf", "fut")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, auth: bytes, request: bytes,
                 fut: asyncio.Future[tuple[socket.socket, bytes]]) -> None:
        self.loop, self.sock, self.fd, self.fut = loop, sock, sock.fileno(), fut
        self.auth, self.request = auth, request
        self.stage = "method"
        self.buf = b""

    def connected(self, greeting: bytes) -> None:
        self.loop.remove_writer(self.fd)
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(UpstreamError(f"upstream unreachable: {errno.errorcode.get(err, err)}"))
            return
        if self._send(greeting):
            self.loop.add_reader(self.fd, self.readable)

    def readable(self) -> None:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(UpstreamError(f"upstream: {e.strerror}"))
            return
        if not data:
            self.fail(UpstreamProtocolError("upstream closed the connection during the handshake"))
            return
        self.buf += data
        self._advance()

    def _advance(self) -> None:
        b = self.buf
        if self.stage == "method":
            if len(b) < 2:
                return
            if b[0] != 5 or b[1] != (2 if self.auth else 0):
                self.fail(UpstreamProtocolError("upstream chose no acceptable method"))
                return
            self.buf, self.stage = b[2:], "auth" if self.auth else "reply"
            if not self._send(self.auth or self.request):
                return
        elif self.stage == "auth":
            if len(b) < 2:
                return
            if b[1] != 0:
                self.fail(UpstreamRefused("upstream refused the credentials", 1))
                return
            self.buf, self.stage = b[2:], "reply"
            if not self._send(self.request):
                return
        else:
            self._reply()
            return
        if self.buf:
            self._advance()

    def _reply(self) -> None:
        b = self.buf
        if len(b) < 5:
            return
        if b[1] != 0:
            self.fail(UpstreamRefused(f"upstream refused CONNECT (0x{b[1]:02x})", b[1]))
            return
        size = {1: 4, 4: 16}.get(b[3])
        end = 4 + (size if size is not None else 1 + b[4]) + 2
        if len(b) < end:
            return
        self.loop.remove_reader(self.fd)
        if not self.fut.done():
            self.fut.set_result((self.sock, b[end:]))

    def _send(self, data: bytes) -> bool:
        try:
            if self.sock.send(data) == len(data):
                return True
            self.fail(UpstreamError("upstream: short send during the handshake"))
        except OSError as e:
            self.fail(UpstreamError(f"upstream: {e.strerror}"))
        return False

    def fail(self, error: Exception) -> None:
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        if not self.fut.done():
            self.fut.set_exception(error)


async def open_upstream(upstream: Upstream, dest_ip: str, dest_port: int,
                        credentials: tuple[str, str] | None) -> Any:
    if upstream.type is not UpstreamType.SOCKS5:
        return await _real_open_upstream(upstream, dest_ip, dest_port, credentials)
    loop = asyncio.get_running_loop()
    sock = connector._new_socket(upstream)
    if upstream.username:
        credentials = (upstream.username, upstream.password)
    greeting, auth, request = _messages(dest_ip, dest_port, credentials)
    fut: asyncio.Future[tuple[socket.socket, bytes]] = loop.create_future()
    hs = _Handshake(loop, sock, auth, request, fut)
    err = sock.connect_ex(connector._sockaddr(upstream))
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise UpstreamError(f"upstream unreachable: {errno.errorcode.get(err, err)}")
    loop.add_writer(hs.fd, hs.connected, greeting)
    timer = loop.call_later(upstream.connect_timeout, hs.fail, UpstreamTimeout("handshake timed out"))
    try:
        return await fut
    except BaseException:
        hs.fail(UpstreamError("cancelled"))
        sock.close()
        raise
    finally:
        timer.cancel()


def install() -> None:
    from metaproxy.relay import server
    server.open_upstream = open_upstream  # type: ignore[assignment]
