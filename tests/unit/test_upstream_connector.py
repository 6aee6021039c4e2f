"""Dialling upstreams (metaproxy.upstream.connector) against scripted fake upstreams on loopback.

The fake reads what the daemon sends, then answers with the bytes a test
scripts: replies that are right, truncated, wrong, huge, slow, or followed by
payload. The real Dial drives the real state machines on a real Poller. Every
outcome is a socket with every payload byte, or a clean error.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Awaitable, Callable

import pytest

from metaproxy.config.model import InetAddress, Upstream, UpstreamType
from metaproxy.errors import UpstreamError, UpstreamProtocolError, UpstreamRefused, UpstreamTimeout
from metaproxy.relay.poller import poller_for
from metaproxy.upstream.connector import Dial, handshake_for

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SOCKS5_OK = b"\x05\x00\x00\x01" + bytes([192, 0, 2, 2]) + b"\x04\x38"
DEST = ("198.51.100.2", 22)


async def run_against(script: Script, kind: UpstreamType = UpstreamType.SOCKS5, timeout: float = 2.0,
                      username: str = "") -> tuple[socket.socket, bytes]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            await asyncio.sleep(0.2)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = Upstream(name="fake", type=kind, address=InetAddress("127.0.0.1", port),
                        username=username, password="pw" if username else "", connect_timeout=timeout)
    try:
        return await open_upstream(upstream, *DEST, credentials=None)
    finally:
        server.close()


async def open_upstream(upstream: Upstream, dest_ip: str, dest_port: int,
                        credentials: tuple[str, str] | None) -> tuple[socket.socket, bytes]:
    """One Dial, as the server runs it, as an awaitable for the tests."""
    loop = asyncio.get_running_loop()
    poller = poller_for(loop)
    done: asyncio.Future[tuple[socket.socket, bytes]] = loop.create_future()

    def finished(sock: socket.socket | None, early: bytes, error: Exception | None) -> None:
        if error is not None:
            done.set_exception(error)
        else:
            assert sock is not None
            done.set_result((sock, early))
    try:
        Dial(poller, loop.call_later, upstream, handshake_for(upstream, dest_ip, dest_port, credentials),
             finished)
        return await done
    finally:
        poller.close()


def handshake(reply: bytes, *, greeting: bytes = b"\x05\x00", delay: float = 0.0) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)  # VER NMETHODS METHOD
        writer.write(greeting)
        await reader.readexactly(10)  # CONNECT to an IPv4 destination
        if delay:
            for byte in reply:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(delay)
        else:
            writer.write(reply)
        await writer.drain()
    return script


def http(reply: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
    return script


def run(coro: Awaitable[tuple[socket.socket, bytes]]) -> tuple[socket.socket, bytes]:
    return asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


def test_socks5_payload_sent_with_the_reply_is_left_for_the_relay() -> None:
    """SOCKS5 replies are read exactly: the banner in the same segment is still in the socket."""
    sock, early = run(run_against(handshake(SOCKS5_OK + b"SSH-2.0-OpenSSH_9.2\r\n")))
    sock.setblocking(True)
    sock.settimeout(2)
    try:
        assert early == b""
        assert sock.recv(100) == b"SSH-2.0-OpenSSH_9.2\r\n"
    finally:
        sock.close()


def test_socks5_reply_byte_by_byte_is_framed_exactly() -> None:
    sock, early = run(run_against(handshake(SOCKS5_OK + b"X", delay=0.01)))
    sock.close()
    assert early in (b"", b"X")  # X may still be in flight; it must never be eaten or corrupted


def test_http_connect_banner_in_the_same_segment_is_kept() -> None:
    sock, early = run(run_against(http(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\nSSH-2.0-x\r\n"),
                                  UpstreamType.HTTP))
    sock.close()
    assert early == b"SSH-2.0-x\r\n"


@pytest.mark.parametrize("reply, text", [
    (b"\x05\x04\x00\x01" + bytes(6), "host unreachable (0x04)"),
    (b"\x05\xf6\x00\x01" + bytes(6), "invalid onion address (Tor) (0xf6)"),
    (b"\x05\x02\x00\x01" + bytes(6), "connection not allowed by ruleset (0x02)"),
])
def test_socks5_refusals_are_named(reply: bytes, text: str) -> None:
    with pytest.raises(UpstreamRefused, match=text.replace("(", r"\(").replace(")", r"\)")):
        run(run_against(handshake(reply)))


def test_http_refusal_is_named() -> None:
    with pytest.raises(UpstreamRefused, match="proxy authentication required"):
        run(run_against(http(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"), UpstreamType.HTTP))


@pytest.mark.parametrize("script", [
    handshake(b"\x05\x00"),                      # truncated reply, then close
    handshake(SOCKS5_OK, greeting=b"\x04\x00"),  # wrong version
    handshake(b"\x05\x00\x00\x09" + bytes(6)),   # unknown address type
])
def test_socks5_broken_replies_are_protocol_errors(script: Script) -> None:
    with pytest.raises(UpstreamProtocolError):
        run(run_against(script))


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 20000 + b"\r\n\r\n",
    b"SSH-2.0-not-http\r\n\r\n",
    b"HTTP/1.1 2",
])
def test_http_broken_replies_are_protocol_errors(reply: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        run(run_against(http(reply), UpstreamType.HTTP))


def test_no_acceptable_method_is_a_refusal() -> None:
    with pytest.raises(UpstreamRefused, match="none of the offered authentication methods"):
        run(run_against(handshake(b"", greeting=b"\x05\xff")))


def test_silent_upstream_hits_the_connect_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3)
    with pytest.raises(UpstreamTimeout, match="within 0.5s"):
        run(run_against(silent, timeout=0.5))


def test_upstream_that_is_down_is_unreachable() -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    upstream = Upstream(name="down", type=UpstreamType.SOCKS5, address=InetAddress("127.0.0.1", port))
    with pytest.raises(UpstreamError, match="unreachable.*is the proxy running"):
        run(open_upstream(upstream, *DEST, credentials=None))


def test_errors_never_name_the_destination() -> None:
    for script in (handshake(b"\x05\x04\x00\x01" + bytes(6)), handshake(b"\x05")):
        with pytest.raises(UpstreamError) as caught:
            run(run_against(script))
        assert DEST[0] not in str(caught.value) and f":{DEST[1]}" not in str(caught.value)


def test_socks4_refuses_ipv6_destinations_without_resolving() -> None:
    upstream = Upstream(name="s4", type=UpstreamType.SOCKS4A, address=InetAddress("127.0.0.1", 9))
    with pytest.raises(UpstreamError, match="cannot carry an IPv6 destination") as caught:
        run(open_upstream(upstream, "2001:db8:2::2", 80, credentials=None))
    assert "2001:db8" not in str(caught.value)


def test_a_malformed_destination_never_becomes_an_upstream_error_text() -> None:
    """Only credential problems are reported as the config's fault; any other ValueError
    (its text may quote the address) propagates to the server's catch-all, which logs
    the type and frames only."""
    upstream = Upstream(name="s5", type=UpstreamType.SOCKS5, address=InetAddress("127.0.0.1", 9))
    with pytest.raises(ValueError) as caught:
        handshake_for(upstream, "198.51.100.999", 80, None)
    assert not isinstance(caught.value, UpstreamError)
    with pytest.raises(UpstreamError, match="256 bytes long.*shorten it in the config"):
        handshake_for(upstream, "198.51.100.2", 80, ("u" * 256, "p"))
