"""The one module that knows python-socks.

python-socks (Debian's 2.0.3) does the SOCKS5, SOCKS4/4a and HTTP CONNECT
handshakes. Two things are ours instead:

1. We open the socket to the upstream ourselves (TCP to an IP literal, or a
   Unix socket for Tor's SocksPort), so python-socks never resolves a name.
2. We hand it a stream whose reads stop exactly where the reply ends. Its own
   stream reads the SOCKS5 bound address and the HTTP reply with one greedy
   recv(65536), which swallows payload that arrives in the same segment as the
   reply (an SSH or SMTP banner). ``_FramedStream`` keeps those bytes, and the
   relay sends them to the client before anything else.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from python_socks import ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio.v2 import Proxy

from metaproxy.config.model import InetAddress, Upstream, UpstreamType
from metaproxy.errors import UpstreamError, UpstreamProtocolError, UpstreamRefused, UpstreamTimeout
from metaproxy.protocol import framing
from metaproxy.protocol.replies import describe

_RECV = 4096
_TYPES = {UpstreamType.SOCKS5: ProxyType.SOCKS5, UpstreamType.SOCKS4: ProxyType.SOCKS4,
          UpstreamType.SOCKS4A: ProxyType.SOCKS4, UpstreamType.HTTP: ProxyType.HTTP}


async def open_upstream(upstream: Upstream, dest_ip: str, dest_port: int,
                        credentials: tuple[str, str] | None) -> tuple[socket.socket, bytes]:
    """Connect through ``upstream`` to dest; return the socket and early payload.

    Raises an UpstreamError subclass whose text never names the destination.
    """
    if ":" in dest_ip and upstream.type in (UpstreamType.SOCKS4, UpstreamType.SOCKS4A):
        # SOCKS4 has room for an IPv4 address only; python-socks would try to
        # resolve the literal, and the daemon never resolves anything.
        raise UpstreamError(f"upstream {upstream.name} is {upstream.type.value}, which cannot carry an "
                            "IPv6 destination; route IPv6 ports through a socks5 or http upstream")
    loop = asyncio.get_running_loop()
    try:
        sock = _new_socket(upstream)
    except OSError as e:
        # Usually EMFILE: accept() took the last descriptor the limit allows.
        raise UpstreamError(f"upstream {upstream.name}: cannot create a socket: {e.strerror or e} "
                            "(raise LimitNOFILE, or lower max_connections)") from e
    try:
        async with asyncio.timeout(upstream.connect_timeout):
            try:
                await loop.sock_connect(sock, _sockaddr(upstream))
            except OSError as e:
                raise UpstreamError(f"upstream {upstream.name} ({upstream.address}) is unreachable: "
                                    f"{e.strerror or e}; is the proxy running?") from e
            stream = _FramedStream(loop, sock, upstream.type)
            await _handshake(upstream, stream, dest_ip, dest_port, credentials)
        return sock, stream.leftover()
    except TimeoutError as e:
        sock.close()
        raise UpstreamTimeout(f"upstream {upstream.name} did not complete the handshake within "
                              f"{upstream.connect_timeout:g}s (connect_timeout)") from e
    except BaseException:
        sock.close()
        raise


async def _handshake(upstream: Upstream, stream: "_FramedStream", dest_ip: str, dest_port: int,
                     credentials: tuple[str, str] | None) -> None:
    username, password = (upstream.username, upstream.password) if upstream.username else (credentials or ("", ""))
    # python-socks uses the proxy host and port only in its messages: the socket is ours.
    proxy = Proxy.create(_TYPES[upstream.type], "127.0.0.1", 0, username=username or None,
                         password=password or None, rdns=upstream.type is UpstreamType.SOCKS4A)
    try:
        await proxy.connect(dest_ip, dest_port, timeout=upstream.connect_timeout, _stream=stream)
    except ProxyError as e:
        code = getattr(e, "error_code", None)
        kind = {UpstreamType.SOCKS5: "socks5", UpstreamType.HTTP: "http"}.get(upstream.type, "socks4")
        if isinstance(code, int):
            raise UpstreamRefused(f"upstream {upstream.name} refused CONNECT: {describe(kind, code)}", code) from e
        # Without a code, python-socks' texts are fixed strings and numbers (the
        # one that would quote an HTTP status line cannot occur: read() checks it).
        raise UpstreamProtocolError(f"upstream {upstream.name} failed the {upstream.type.value} "
                                    f"handshake: {e}") from e
    except framing.FramingError as e:
        raise UpstreamProtocolError(f"upstream {upstream.name}: {e}") from e
    except ProxyTimeoutError as e:
        raise TimeoutError() from e
    except (ConnectionError, EOFError, asyncio.IncompleteReadError) as e:
        raise UpstreamProtocolError(f"upstream {upstream.name} closed the connection during the "
                                    f"{upstream.type.value} handshake") from e
    except OSError as e:
        raise UpstreamError(f"upstream {upstream.name}: handshake failed: {e.strerror or e}") from e


def _new_socket(upstream: Upstream) -> socket.socket:
    if isinstance(upstream.address, InetAddress):
        family = socket.AF_INET6 if ":" in upstream.address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


def _sockaddr(upstream: Upstream) -> Any:
    a = upstream.address
    return (a.host, a.port) if isinstance(a, InetAddress) else a.path


class _FramedStream:
    """python-socks' stream interface, with reads that end where the reply ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, kind: UpstreamType) -> None:
        self._loop, self._sock, self._kind = loop, sock, kind
        self._buffer = bytearray()

    async def write_all(self, data: bytes) -> None:
        await self._loop.sock_sendall(self._sock, data)

    async def read_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._fill()
        return self._take(n)

    async def read(self, max_bytes: int = 65536) -> bytes:
        """python-socks calls this for the SOCKS5 bound address and the HTTP reply."""
        if self._kind is UpstreamType.HTTP:
            while (end := framing.http_reply_end(bytes(self._buffer))) is None:
                await self._fill()
            head = self._take(end)
            framing.http_status(head)  # a malformed status line is ours to report
            return head
        while (need := framing.socks5_address_length(bytes(self._buffer[:2]))) is None \
                or len(self._buffer) < need:
            await self._fill()
        return self._take(need)

    async def close(self) -> None:
        """python-socks calls this on failure; open_upstream closes the socket."""

    def leftover(self) -> bytes:
        return bytes(self._buffer)

    async def _fill(self) -> None:
        data = await self._loop.sock_recv(self._sock, _RECV)
        if not data:
            raise EOFError("the upstream closed the connection")
        self._buffer += data

    def _take(self, n: int) -> bytes:
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out
