"""Redirected connections are relayed through every kind of upstream, over IPv4 and IPv6.

The shared daemon routes each destination port to one upstream (conftest.UPSTREAMS);
curl and wget run unmodified in the client namespace, and only the REDIRECT
rules send them to the daemon. The web namespace is reachable only through a
proxy, so a page that arrives went through the upstream named by its port.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
import time

import pytest

from tests.system import clients, peers
from tests.system.daemon import Daemon, StartDaemon, daemon_section
from tests.system.lab import GATEWAY4, WEB4, WEB6, url_host
from tests.system.peers import World
from tests.system.topology import SINK_ROUTE, UPSTREAMS

# (upstream, destination family) pairs that can work. SOCKS4 carries only IPv4
# destinations; dante, our SOCKS4 peer, does not implement the 4a hostname
# extension, so socks4a to an IPv6 literal has no peer that could carry it.
RELAYED = [name for name in UPSTREAMS if not name.startswith("iso_")]
IPV4_ONLY = {"socks4", "socks4a"}
CASES = [(name, family) for name in RELAYED for family in ("ipv4", "ipv6")
         if not (family == "ipv6" and name in IPV4_ONLY)]
WEB = {"ipv4": WEB4, "ipv6": WEB6}


@pytest.mark.parametrize("client", ["curl", "wget"])
@pytest.mark.parametrize("upstream,family", CASES)
def test_unmodified_client_fetches_page_through_each_upstream(world: World, relay: Daemon,
                                                               upstream: str, family: str,
                                                               client: str) -> None:
    """curl and wget, with no proxy settings, get the page through the upstream that
    the destination port routes to, for IPv4 and IPv6 destinations."""
    port = UPSTREAMS[upstream][0]
    fetch = clients.curl if client == "curl" else clients.wget
    got = fetch(world.client, clients.url(WEB[family], port, "/index.html"))
    assert got.ok, f"{client} via {upstream} ({family}) failed: {got.stderr}\ndaemon:\n{relay.log()[-3000:]}"
    assert got.body.decode() == peers.INDEX


@pytest.mark.parametrize("upstream", sorted(IPV4_ONLY))
def test_socks4_upstream_with_ipv6_destination_is_reset_promptly(world: World, relay: Daemon,
                                                                 upstream: str) -> None:
    """A SOCKS4 upstream cannot carry an IPv6 destination: the client is reset at
    once instead of hanging."""
    outcome = clients.exchange(world.client, WEB6, UPSTREAMS[upstream][0], b"GET / HTTP/1.0\r\n\r\n")
    assert outcome.reset, f"expected a reset, got {outcome}"
    assert outcome.seconds < 1.0


def test_upstream_credentials_are_checked_by_the_peer(world: World, relay: Daemon) -> None:
    """The configured SOCKS5 and HTTP Basic credentials reach the peers that check them:
    tinyproxy logs the CONNECT it accepted with auth."""
    got = clients.curl(world.client, clients.url(WEB4, UPSTREAMS["http"][0]))
    assert got.ok, got.stderr
    assert f"CONNECT {WEB4}:{UPSTREAMS['http'][0]}" in world.gateway.tinyproxy_log.read_text()


def _squid_requests(world: World, mark: int) -> list[list[str]]:
    """Each request after mark as squid read it off the wire (debug section 11,2 in
    cache.log): its request line, then its header lines."""
    text = world.gateway.squid_cache_log.read_text(errors="replace")[mark:]
    return [block.split("\n") for block in re.findall(r"HTTP Client REQUEST:\n-+\n(.*?)\n\n", text, re.DOTALL)]


def _squid_access_line(world: World, mark: int, needle: str, timeout: float = 5) -> str:
    """squid's access.log line containing needle after mark; squid writes a tunnel's line
    when the tunnel closes, so wait for it (bounded)."""
    for _ in range(int(timeout / 0.05) + 1):
        text = world.gateway.squid_access_log.read_text(errors="replace")[mark:]
        found = [line for line in text.splitlines() if needle in line]
        if found:
            return found[-1]
        time.sleep(0.05)
    return ""


@pytest.mark.parametrize("client", ["curl", "wget"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_squid_gets_authority_form_connect_with_basic_auth(world: World, relay: Daemon,
                                                           family: str, client: str) -> None:
    """squid, which parses the CONNECT authority strictly and checks Basic auth, receives
    ``CONNECT 198.51.100.2:port`` for an IPv4 destination and the bracketed
    ``CONNECT [2001:db8:2::2]:port`` (RFC 9110 authority-form) for an IPv6 one, with a Host
    header that matches and nothing that names Python or a library; it tunnels it for the
    configured user, and the page arrives."""
    port = UPSTREAMS["squid"][0]
    authority = f"{url_host(WEB[family])}:{port}"
    cache_mark = len(world.gateway.squid_cache_log.read_text(errors="replace"))
    access_mark = len(world.gateway.squid_access_log.read_text(errors="replace"))
    fetch = clients.curl if client == "curl" else clients.wget
    got = fetch(world.client, clients.url(WEB[family], port, "/index.html"))
    requests = _squid_requests(world, cache_mark)
    assert [r[0] for r in requests] == [f"CONNECT {authority} HTTP/1.1"], (
        f"squid read {requests}, expected one request line CONNECT {authority} HTTP/1.1")
    headers = requests[0][1:]
    assert f"Host: {authority}" in headers, headers
    fingerprints = [h for h in headers if re.search(r"python|socks", h, re.IGNORECASE)]
    assert not fingerprints, f"headers that name Python or a library on every CONNECT: {fingerprints}"
    assert got.ok, f"{client} via squid ({family}) failed: {got.stderr}\ndaemon:\n{relay.log()[-3000:]}"
    assert got.body.decode() == peers.INDEX
    line = _squid_access_line(world, access_mark, f"CONNECT {authority} ")
    assert f"user={peers.HTTP_USER} CONNECT {authority} status=200 TCP_TUNNEL" in line, line


@pytest.mark.parametrize("upstream,family", [("dante", "ipv4"), ("http_v6", "ipv6")])
def test_50mb_download_arrives_intact(world: World, relay: Daemon, upstream: str, family: str) -> None:
    """A 50 MB file downloaded through the relay has the sha256 of the original."""
    out = os.path.join(world.lab.tmp, f"download-{upstream}-{family}.bin")
    try:
        got = clients.curl(world.client, clients.url(WEB[family], UPSTREAMS[upstream][0], "/big.bin"),
                           out=out, timeout=60)
        assert got.ok, f"{got.stderr}\ndaemon:\n{relay.log()[-3000:]}"
        assert os.path.getsize(out) == peers.BIG_SIZE
        assert _sha256_file(out) == world.web.big_sha256
    finally:
        if os.path.exists(out):
            os.unlink(out)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_50mb_upload_arrives_intact(world: World, relay: Daemon, family: str) -> None:
    """50 MB sent through the relay, then a half-close, reach the sink byte for byte:
    it replies with the sha256 and length of what it read."""
    payload = os.urandom(peers.BIG_SIZE)
    outcome = clients.exchange(world.client, WEB[family], SINK_ROUTE[0], payload,
                               half_close=True, timeout=60)
    assert not outcome.reset and not outcome.error, f"{outcome}\ndaemon:\n{relay.log()[-3000:]}"
    assert outcome.data.decode() == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_half_close_passes_through_and_reply_still_arrives(world: World, relay: Daemon,
                                                           family: str) -> None:
    """A client that shuts down its write side still reads the whole reply: the
    daemon passes our EOF on as a half-close and keeps the other direction open."""
    payload = b"half-close test\n" * 1000
    outcome = clients.exchange(world.client, WEB[family], SINK_ROUTE[0], payload, half_close=True)
    assert not outcome.reset and not outcome.error, f"{outcome}\ndaemon:\n{relay.log()[-3000:]}"
    assert outcome.data.decode() == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n"


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_nftables_redirect_is_relayed_too(world: World, relay: Daemon, family: str) -> None:
    """The daemon does not care which tool redirected: an nftables ``redirect`` rule
    (IPv4 and IPv6 in one inet table) works like the iptables one."""
    world.lab.redirect_to(relay.port, backend="nftables")
    try:
        got = clients.curl(world.client, clients.url(WEB[family], UPSTREAMS["dante"][0], "/index.html"))
        assert got.ok, got.stderr
        assert got.body.decode() == peers.INDEX
    finally:
        world.lab.redirect_to(relay.port)


def test_idle_connection_is_closed_after_idle_timeout(world: World, start_own_daemon: StartDaemon) -> None:
    """A relayed connection on which no byte moves either way is closed after idle_timeout."""
    def config(port: int) -> str:
        return daemon_section(port, idle_timeout=1) + (
            f"[upstreams]\n    [[dante]]\n    type = socks5\n    address = {GATEWAY4}:{peers.DANTE_PORT}\n"
            f"[routes]\n{peers.SILENT_PORT} = dante\n")
    daemon = start_own_daemon("metaproxy-idle", config)
    outcome = clients.exchange(world.client, WEB4, peers.SILENT_PORT, b"hello", timeout=10)
    assert not outcome.error, f"still open after {outcome.seconds:.1f}s\ndaemon:\n{daemon.log()}"
    assert outcome.data == b""
    assert 0.8 <= outcome.seconds < 3.0, outcome


def _dante_session_starts(world: World, mark: int, dest_port: int, count: int, timeout: float = 5) -> None:
    """Wait (bounded) until dante has logged `count` opened sessions to dest_port after mark."""
    for _ in range(int(timeout / 0.05) + 1):
        text = world.gateway.dante_log.read_text(errors="replace")[mark:]
        if sum(1 for line in text.splitlines()
               if "tcp/connect [:" in line and line.rstrip().endswith(f".{dest_port}")) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"dante did not log {count} sessions to port {dest_port}")


def _dante_session_ends(world: World, mark: int, dest_port: int, count: int, timeout: float = 5) -> list[str]:
    """dante's "session ended" lines (tcp/connect ]) to dest_port logged after mark."""
    lines: list[str] = []
    for _ in range(int(timeout / 0.05) + 1):
        text = world.gateway.dante_log.read_text(errors="replace")[mark:]
        lines = [line for line in text.splitlines()
                 if "tcp/connect ]:" in line and re.search(rf"\.{dest_port} -> \d+: ", line)]
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"dante logged {len(lines)} of {count} session ends to port {dest_port}:\n"
                         f"{world.gateway.dante_log.read_text(errors='replace')[mark:]}")


def test_client_reset_reaches_upstream_as_reset_and_close_as_close(world: World, relay: Daemon) -> None:
    """A client that aborts (RST) makes the daemon reset the upstream connection too, while
    an orderly close stays orderly: dante's log tells "reset by peer" from "closed"."""
    mark = len(world.gateway.dante_log.read_text(errors="replace"))
    aborted = world.client.connect(WEB4, peers.SILENT_PORT)
    aborted.sendall(b"abort me")
    _dante_session_starts(world, mark, peers.SILENT_PORT, 1)
    aborted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    aborted.close()
    [end] = _dante_session_ends(world, mark, peers.SILENT_PORT, 1)
    assert "reset by peer" in end, end
    mark = len(world.gateway.dante_log.read_text(errors="replace"))
    closed = world.client.connect(WEB4, peers.SILENT_PORT)
    closed.sendall(b"close me")
    _dante_session_starts(world, mark, peers.SILENT_PORT, 1)
    closed.close()
    [end] = _dante_session_ends(world, mark, peers.SILENT_PORT, 1)
    assert "local client closed" in end, end


def test_max_connections_refuses_further_clients_with_reset(world: World,
                                                           start_own_daemon: StartDaemon) -> None:
    """With max_connections = 2, a third client is reset at once; once one closes, a new
    client is relayed again."""
    def config(port: int) -> str:
        return daemon_section(port, max_connections=2, log_connections="yes") + (
            f"[upstreams]\n    [[dante]]\n    type = socks5\n    address = {GATEWAY4}:{peers.DANTE_PORT}\n"
            f"[routes]\n{peers.SILENT_PORT} = dante\n{peers.SINK_PORT} = dante\n")
    daemon = start_own_daemon("metaproxy-max", config)
    held = [world.client.connect(WEB4, peers.SILENT_PORT) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"x")
        assert "cid=2 open" in daemon.wait_log("cid=2 open"), daemon.log()
        third = clients.exchange(world.client, WEB4, peers.SINK_PORT, b"x", half_close=True)
        assert third.reset and third.seconds < 1.0, f"{third}\ndaemon:\n{daemon.log()}"
    finally:
        held.pop().close()
    try:
        mark = daemon.mark()
        assert "close" in daemon.wait_log("close", since=mark), daemon.log()
        again = clients.exchange(world.client, WEB4, peers.SINK_PORT, b"x", half_close=True)
        assert again.data.decode() == f"{hashlib.sha256(b'x').hexdigest()} 1\n", f"{again}\n{daemon.log()}"
    finally:
        for sock in held:
            sock.close()


def test_100_concurrent_connections_each_arrive_intact(world: World, relay: Daemon) -> None:
    """100 clients at once, half to IPv4 and half to IPv6, each upload 1 MB and half-close:
    every one gets back the sha256 of exactly its own bytes."""
    import threading
    results: dict[int, bool] = {}

    def one(index: int) -> None:
        data = os.urandom(1 << 20)
        outcome = clients.exchange(world.client, WEB4 if index % 2 else WEB6, SINK_ROUTE[0], data,
                                   half_close=True, timeout=30)
        results[index] = outcome.data.decode() == f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    bad = sorted(i for i in range(100) if not results.get(i))
    assert not bad, f"{len(bad)} of 100 connections failed: {bad[:10]}\ndaemon:\n{relay.log()[-3000:]}"
