"""A server that speaks first, like SSH or SMTP, is relayed through every kind of upstream.

servers.py banner, in the web namespace, sends peers.BANNER as soon as it
accepts, then echoes. topology.BANNER_ROUTES routes one of its ports to each
upstream, so the banner crosses exactly that proxy. The client, in the client
namespace and sent to the daemon by the REDIRECT rules alone, sends nothing
until the whole banner has arrived: the first bytes it reads must be the banner,
with no byte of the proxy's reply before it and none of the banner lost.

A daemon that reads the proxy's reply greedily keeps what came after the reply
for itself. Real proxies send the banner after their reply, usually in a
second segment, so the scripted upstream (scripted_upstream.py) makes the hard
case certain: it sends its reply and the banner with one send().
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.system import peers
from tests.system.daemon import Daemon
from tests.system.lab import WEB4, WEB6
from tests.system.peers import World
from tests.system.topology import BANNER_ROUTES, SCRIPTED_UPSTREAMS

WEB = {"ipv4": WEB4, "ipv6": WEB6}
# SOCKS4 carries IPv4 destinations only (the daemon resets an IPv6 one, see test_relay).
IPV4_ONLY = {"socks4", "socks4a", "scripted_socks4", "scripted_socks4a"}
REAL = [name for name in BANNER_ROUTES if name not in SCRIPTED_UPSTREAMS]
SCRIPTED = [name for name in BANNER_ROUTES if name in SCRIPTED_UPSTREAMS]


def _cases(names: list[str]) -> list[tuple[str, str]]:
    return [(name, family) for name in names for family in ("ipv4", "ipv6")
            if not (family == "ipv6" and name in IPV4_ONLY)]


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    """Exactly `count` bytes, or fewer if the peer closes or resets first (bounded: the
    socket has a timeout, and each pass reads at least one byte or stops)."""
    data = b""
    for _ in range(count):
        try:
            chunk = sock.recv(count - len(data))
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
        if len(data) == count:
            break
    return data


def _read_to_eof(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    data = b""
    for _ in range(limit):
        chunk = sock.recv(limit)
        if not chunk:
            break
        data += chunk
        if len(data) >= limit:
            break
    return data


def _evidence(world: World, relay: Daemon, upstream: str) -> str:
    """What the peer and the daemon said, for a failure message."""
    if upstream in SCRIPTED_UPSTREAMS:
        peer = f"scripted upstream:\n{world.gateway.scripted_upstream.output(tail=1500)}"
    elif upstream == "squid":
        peer = f"squid access.log:\n{world.gateway.squid_access_log.read_text(errors='replace')[-1500:]}"
    else:
        peer = ""
    return f"{peer}\ndaemon:\n{relay.log()[-2000:]}"


def _greeted_then_echoed(world: World, relay: Daemon, upstream: str, family: str) -> None:
    """Connect through `upstream`, read the banner before sending anything, then echo."""
    sock = world.client.connect(WEB[family], BANNER_ROUTES[upstream], timeout=10)
    try:
        greeting = _read_exactly(sock, len(peers.BANNER))
        assert greeting == peers.BANNER, (
            f"via {upstream} ({family}) the client's first bytes were {greeting!r}, "
            f"expected the server's banner {peers.BANNER!r}\n{_evidence(world, relay, upstream)}")
        sock.sendall(b"ping\n")
        assert _read_exactly(sock, 5) == b"ping\n", _evidence(world, relay, upstream)
        sock.shutdown(socket.SHUT_WR)
        try:
            rest = _read_to_eof(sock)
        except socket.timeout:
            raise AssertionError(f"no EOF after our half-close via {upstream} ({family})\n"
                                 f"{_evidence(world, relay, upstream)}") from None
        assert rest == b"", f"bytes after the echo: the reply or banner came twice: {rest!r}"
    finally:
        sock.close()


@pytest.mark.parametrize("upstream,family", _cases(REAL))
def test_banner_first_server_greets_client_intact_through_each_real_upstream(
        world: World, relay: Daemon, upstream: str, family: str) -> None:
    """Through dante (SOCKS5, SOCKS4, SOCKS4a), microsocks, tinyproxy, squid and socat on a
    Unix socket, a client that waits for the server to speak first gets the banner
    intact as its first bytes, then an echo round trip works."""
    _greeted_then_echoed(world, relay, upstream, family)


def _sent_in_one_segment(world: World, mark: int, port: int, timeout: float = 5) -> str:
    """The scripted upstream's log line for a CONNECT to `port` after mark, once it is written."""
    line = ""
    for _ in range(int(timeout / 0.05) + 1):
        text = world.gateway.scripted_upstream.output()[mark:]
        found = [ln for ln in text.splitlines() if re.search(rf"[ :]{port}\b.*reply\+banner", ln)]
        if found:
            line = found[-1]
            break
        time.sleep(0.05)
    return line


@pytest.mark.parametrize("upstream,family", _cases(SCRIPTED))
def test_banner_in_the_same_segment_as_the_proxy_reply_reaches_client_intact(
        world: World, relay: Daemon, upstream: str, family: str) -> None:
    """When the upstream writes its SOCKS5, SOCKS4, SOCKS4a or HTTP CONNECT reply and the
    server's banner with one send(), the daemon reads the reply to its last byte and
    hands the banner to the client: nothing of it is lost or held back."""
    mark = len(world.gateway.scripted_upstream.output())
    _greeted_then_echoed(world, relay, upstream, family)
    # The hard case really happened: one send() carried the reply and the whole banner.
    line = _sent_in_one_segment(world, mark, BANNER_ROUTES[upstream])
    match = re.search(r"reply\+banner (\d+)/(\d+) bytes", line)
    assert match and match[1] == match[2], f"the scripted upstream split its write: {line!r}"
