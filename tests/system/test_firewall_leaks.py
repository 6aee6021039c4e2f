"""With the strict rules loaded, nothing leaves the client except to the proxy (root, lab).

    client 192.0.2.1 --veth-- gateway 192.0.2.2 (dante :1080) --veth-- web 198.51.100.2 (nginx)

The client namespace gets the rules of ``--print-rules ... --strict`` and
runs the daemon (SOCKS5 upstream: dante at 192.0.2.2:1080) and a resolver
on 127.0.0.1:5353 (as Tor's DNSPort would be, ``[firewall] dns``). The
gateway runs a decoy resolver on port 53, standing in for whatever the
system's resolv.conf names; it sits on the client's own link, so a query
that got out would reach it and be answered (the gateway forwards nothing,
so the web namespace could not serve as a decoy).

tcpdump runs in the gateway namespace on the veth that faces the client,
capturing every frame whose source MAC is the client's (ARP aside). A
packet counts as a leak unless it is TCP to 192.0.2.2:1080. Then the client:

- fetches pages over IPv4 and IPv6 with curl (redirected through the proxy);
- looks a name up through the decoy, over IPv4 and IPv6 (glibc, getent),
  and sends it raw DNS queries;
- opens DNS over TCP to the decoy;
- sends QUIC-like UDP to port 443, over IPv4 and IPv6;
- sends UDP to the proxy's own address (a SOCKS UDP ASSOCIATE would);
- pings over IPv4 and IPv6 (raw ICMP echo), and sends a raw IP packet of
  an unassigned protocol;
- connects directly as the daemon's own user (which is not diverted, so
  only the filter stands in the way).

All of it once with the daemon running and once after it has stopped
(fail-closed), on nft, iptables-nft and iptables-legacy. Every leak count
must be 0, the decoy must never hear a query, and a name must resolve to
the configured resolver's answer only.

Before the rules are loaded, a control packet proves that the capture does
see a leak when there is one.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from metaproxy.config import load
from metaproxy.firewall import render
from tests.preconditions import unmet
from tests.system import peers
from tests.system.daemon import Daemon, daemon_section, next_port, start_daemon
from tests.system.lab import (CLIENT4, GATEWAY4, GATEWAY6, PYTHON, SYSPATH, WEB4, WEB6, Lab, LabError, Namespace, Process,
                              url_host)

REQUIRED = ["ip", "nft", "iptables-nft-restore", "ip6tables-nft-restore", "iptables-legacy-restore",
            "ip6tables-legacy-restore", "tcpdump", "danted", "nginx", "curl", "getent", "unshare", "setpriv"]

WEB_PORT = 8080
PROXY_PORT = peers.DANTE_PORT
RESOLVER = ("127.0.0.1", 5353)           # [firewall] dns, like Tor's DNSPort
RESOLVER_ANSWER = "203.0.113.77"         # what the configured resolver says
DECOY_ANSWER = "203.0.113.66"            # what the decoy would say: must never be seen
NAME = "leaktest.example"
NOT_PROXY = f"not (dst host {GATEWAY4} and tcp dst port {PROXY_PORT})"
CAPTURE_MAX = 100_000

# A minimal DNS responder (A records only), run with /usr/bin/python3 -c.
# argv: ANSWER LOGFILE HOST:PORT...; every query is logged as "<peer> <qtype>".
DNS_RESPONDER = r"""
import socket, struct, sys, threading
answer = socket.inet_aton(sys.argv[1])
log = open(sys.argv[2], "a", buffering=1)
def serve(sock):
    while True:
        query, peer = sock.recvfrom(4096)
        end = 12
        while end < len(query) and query[end]:
            end += 1 + query[end]
        if len(query) < end + 5:
            continue
        qtype = struct.unpack("!H", query[end + 1:end + 3])[0]
        log.write(f"{peer[0]} {qtype}\n")
        record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + answer if qtype == 1 else b""
        header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if record else 0, 0, 0)
        sock.sendto(header + query[12:end + 5] + record, peer)
socks = []
for spec in sys.argv[3:]:
    host, _, port = spec.rpartition(":")
    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, int(port)))
    socks.append(sock)
for sock in socks:
    threading.Thread(target=serve, args=(sock,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


# ---- preconditions and the lab ------------------------------------------------------------

def _precondition() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "the leak tests need root (network namespaces, netfilter, tcpdump)"
    elif missing := [b for b in REQUIRED if shutil.which(b, path=SYSPATH) is None]:
        reason = f"missing programs: {', '.join(missing)} (see .ci/apt-packages; `make deps` installs them)"
    unmet(reason)


@dataclass
class LeakLab:
    lab: Lab
    client_mac: str
    resolver_log: Path
    decoy_log: Path
    processes: dict[str, Process] = field(default_factory=dict)


@pytest.fixture(scope="module")
def leaklab() -> Iterator[LeakLab]:
    """A lab of our own (prefix mpfw<pid>), with dante, nginx and the two resolvers."""
    _precondition()
    lab = Lab(prefix=f"mpfw{os.getpid()}")
    try:
        lab.build()
        processes = {"dante": peers.start_dante(lab)}
        processes["nginx"] = peers.start_nginx(lab, [WEB_PORT])[0]
        resolver_log, decoy_log = lab.tmp / "resolver.queries", lab.tmp / "decoy.queries"
        processes["resolver"] = _responder(lab, lab.client, "resolver", RESOLVER_ANSWER, resolver_log,
                                           [f"{RESOLVER[0]}:{RESOLVER[1]}"])
        processes["decoy"] = _responder(lab, lab.gateway, "decoy", DECOY_ANSWER, decoy_log,
                                        [f"{GATEWAY4}:53", f"[{GATEWAY6}]:53"])
        link = lab.client.run(["cat", "/sys/class/net/to-gw/address"]).stdout.decode().strip()
        yield LeakLab(lab, link, resolver_log, decoy_log, processes)
    finally:
        lab.close()


def _responder(lab: Lab, ns: Namespace, name: str, answer: str, log: Path, listen: list[str]) -> Process:
    log.touch()
    process = ns.spawn(name, [PYTHON, "-c", DNS_RESPONDER, answer, str(log), *listen])
    _wait_for(lambda: "ready" in process.output() or not process.alive(), 10, f"{name} to start")
    if not process.alive():
        raise LabError(f"{name} exited:\n{process.output()}")
    return process


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if condition():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise LabError(f"timed out after {timeout}s waiting for {what}")


# ---- the rules --------------------------------------------------------------------------

# loader -> [(back-end, tool argv)]
LOADERS = {
    "nftables": [("nftables", ["nft", "-f", "-"])],
    "iptables-nft": [("iptables", ["iptables-nft-restore", "--noflush"]),
                     ("ip6tables", ["ip6tables-nft-restore", "--noflush"])],
    "iptables-legacy": [("iptables", ["iptables-legacy-restore", "--noflush"]),
                        ("ip6tables", ["ip6tables-legacy-restore", "--noflush"])],
}


class Rules:
    """The strict ruleset of a config, loaded into the client namespace until ``unload``.

    Under TPROXY the policy routing that the ruleset prints as comments
    ("#   ip -4 rule add ...") is run as printed, and undone the same way.
    """

    def __init__(self, lab: Lab, loader: str, config_path: Path) -> None:
        self.lab, self.loader, self.config = lab, loader, load(str(config_path))
        self.loaded: list[tuple[str, list[str]]] = []
        self.routing_undo: list[list[str]] = []

    def load(self) -> None:
        for backend, argv in LOADERS[self.loader]:
            text = render(self.config, backend, strict=True)
            self.lab.client.run(argv, input=text.encode())
            self.loaded.append((backend, argv))
            for line in text.splitlines():
                if line.startswith("#   ip -") and " add " in line:
                    self.lab.client.run(line[len("#   "):].split())
                    self.routing_undo.append(line[len("#   "):].replace(" add ", " del ").split())

    def unload(self) -> None:
        while self.routing_undo:
            self.lab.client.run(self.routing_undo.pop(), check=False)
        while self.loaded:
            backend, argv = self.loaded.pop()
            self.lab.client.run(argv, input=render(self.config, backend, strict=True, unload=True).encode(),
                                check=False)


# ---- the capture ------------------------------------------------------------------------

class Capture:
    """tcpdump on the gateway's veth towards the client: every frame the client sends."""

    def __init__(self, leak: LeakLab, name: str) -> None:
        self.leak, self.pcap = leak, leak.lab.tmp / f"{name}.pcap"
        self.process: Process | None = None
        self.name = name

    def __enter__(self) -> "Capture":
        # --immediate-mode: hand each frame over at once, or frames still in the
        # kernel's ring when we stop tcpdump would be lost, uncounted.
        argv = ["tcpdump", "-i", "to-client", "-n", "-U", "--immediate-mode", "-Z", "root", "-c", str(CAPTURE_MAX),
                "-w", str(self.pcap), f"ether src {self.leak.client_mac} and not arp"]
        self.process = self.leak.lab.gateway.spawn(f"tcpdump-{self.name}", argv)
        _wait_for(lambda: "listening on" in self.process.output() or not self.process.alive(), 10,  # type: ignore[union-attr]
                  "tcpdump to listen")
        if not self.process.alive():
            raise LabError(f"tcpdump exited:\n{self.process.output()}")
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # let the last frames reach the capture
        if self.process is not None:
            self.process.stop()
            stats = self.process.output()
            if " packets dropped by kernel" in stats and "\n0 packets dropped by kernel" not in stats:
                raise LabError(f"tcpdump lost frames; the count would be wrong:\n{stats}")

    def packets(self, expression: str) -> list[str]:
        proc = self.leak.lab.gateway.run(["tcpdump", "-r", str(self.pcap), "-n", "-e", expression], check=False)
        if proc.returncode != 0:
            raise LabError(f"tcpdump -r failed:\n{proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode(errors="replace").splitlines()

    def leaks(self) -> list[str]:
        return self.packets(NOT_PROXY)

    def to_proxy(self) -> list[str]:
        return self.packets(f"dst host {GATEWAY4} and tcp dst port {PROXY_PORT}")


# ---- traffic from the client -----------------------------------------------------------

@dataclass
class Traffic:
    """What the client's programs saw."""
    fetched: dict[str, tuple[int, bytes, float]] = field(default_factory=dict)
    lookups: dict[str, tuple[int, str]] = field(default_factory=dict)
    sockets: dict[str, str] = field(default_factory=dict)


def generate(leak: LeakLab) -> Traffic:
    lab, client, out = leak.lab, leak.lab.client, Traffic()
    for label, host in (("tcp4", WEB4), ("tcp6", WEB6)):
        out.fetched[label] = _curl(client, f"http://{url_host(host)}:{WEB_PORT}/index.html")
    out.fetched["tcp4 as the daemon's user"] = _curl(client, f"http://{WEB4}:{WEB_PORT}/index.html",
                                                     as_user="nobody")
    for label, nameserver in (("dns4", GATEWAY4), ("dns6", GATEWAY6)):
        out.lookups[label] = _lookup(lab, nameserver)
    out.sockets["dns over tcp4"] = client.call(lambda: _tcp(GATEWAY4, 53))
    out.sockets["quic4"] = client.call(lambda: _udp(WEB4, 443, b"\xc3\x00\x00\x00\x01" + b"\x00" * 1195))
    out.sockets["quic6"] = client.call(lambda: _udp(WEB6, 443, b"\xc3\x00\x00\x00\x01" + b"\x00" * 1195))
    out.sockets["udp to the proxy"] = client.call(lambda: _udp(GATEWAY4, PROXY_PORT, b"\x00\x00\x00\x01"))
    out.sockets["dns4 raw udp"] = client.call(lambda: _udp(GATEWAY4, 53, _query(NAME)))
    out.sockets["dns6 raw udp"] = client.call(lambda: _udp(GATEWAY6, 53, _query(NAME)))
    out.sockets["ping4"] = client.call(lambda: _raw(socket.AF_INET, socket.IPPROTO_ICMP, WEB4,
                                                    _icmp_echo(8)))
    out.sockets["ping6"] = client.call(lambda: _raw(socket.AF_INET6, socket.IPPROTO_ICMPV6, WEB6,
                                                    _icmp_echo(128)))
    out.sockets["ip proto 253"] = client.call(lambda: _raw(socket.AF_INET, 253, WEB4, b"leak?"))
    return out


def _curl(ns: Namespace, url: str, as_user: str | None = None) -> tuple[int, bytes, float]:
    argv = ["curl", "-q", "--silent", "--show-error", "--fail", "--noproxy", "*", "--max-time", "8", url]
    if as_user:
        argv = ["setpriv", f"--reuid={as_user}", "--regid=nogroup", "--clear-groups", "--", *argv]
    start = time.monotonic()
    try:
        proc = ns.run(argv, check=False, timeout=15)
    except subprocess.TimeoutExpired:
        return -1, b"", time.monotonic() - start
    return proc.returncode, proc.stdout, time.monotonic() - start


def _lookup(lab: Lab, nameserver: str) -> tuple[int, str]:
    """getent (glibc) in the client, with a resolv.conf naming the decoy, bind-mounted privately."""
    resolv = lab.file(f"resolv-{nameserver.replace(':', '_')}.conf",
                      f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec getent ahostsv4 "$1"', str(resolv), NAME]
    try:
        proc = lab.client.run(argv, check=False, timeout=15)
    except subprocess.TimeoutExpired:
        return -1, "getent timed out"
    return proc.returncode, proc.stdout.decode(errors="replace")


def _tcp(host: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        try:
            s.connect((host, port))
            s.sendall(b"\x00\x1d" + _query(NAME))
            return f"connected, read {s.recv(512)!r}"
        except OSError as e:
            return f"{type(e).__name__}: {e}"


def _udp(host: str, port: int, payload: bytes) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        try:
            s.connect((host, port))
            s.send(payload)
            return f"answer {s.recv(4096)[:16]!r}"
        except OSError as e:
            return f"{type(e).__name__}: {e}"


def _raw(family: int, proto: int, host: str, payload: bytes) -> str:
    with socket.socket(family, socket.SOCK_RAW, proto) as s:
        s.settimeout(1)
        try:
            s.sendto(payload, (host, 0))
            return f"sent, then {s.recv(4096)[:8]!r}"
        except OSError as e:
            return f"{type(e).__name__}: {e}"


def _icmp_echo(kind: int) -> bytes:
    """An echo request; the kernel fills in the ICMPv6 checksum, we compute the ICMPv4 one."""
    body = struct.pack("!HH", os.getpid() & 0xFFFF, 1) + b"metaproxy leak test"
    if kind == 128:
        return struct.pack("!BBH", kind, 0, 0) + body
    data = struct.pack("!BBH", kind, 0, 0) + body
    data += b"\x00" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    checksum = ~(total + (total >> 16)) & 0xFFFF
    return struct.pack("!BBH", kind, 0, checksum) + body


def _query(name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", 0x4D50, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)


# ---- the test ---------------------------------------------------------------------------

def config_text(port: int, mode: str) -> str:
    return daemon_section(port, mode=mode, connect_timeout=5) + f"""\
[upstreams]
    [[dante]]
    type = socks5
    address = {GATEWAY4}:{PROXY_PORT}
[routes]
* = dante
[firewall]
dns = {RESOLVER[0]}:{RESOLVER[1]}
"""


def report(capture: Capture, traffic: Traffic) -> str:
    """For a failed assertion: the leaks, what the client saw, and the rules with their counters."""
    lab = capture.leak.lab
    rules = [lab.client.run(argv, check=False).stdout.decode(errors="replace")
             for argv in (["nft", "list", "ruleset"], ["iptables-legacy-save", "-c"], ["ip6tables-legacy-save", "-c"])]
    return "\n".join(["leaked packets:", *capture.leaks(), "what the client saw:",
                      *(f"  {k}: exit {v[0]} {v[1][:60]!r} in {v[2]:.1f}s" for k, v in traffic.fetched.items()),
                      *(f"  {k}: {v}" for k, v in traffic.lookups.items()),
                      *(f"  {k}: {v}" for k, v in traffic.sockets.items()),
                      "rules in the client namespace:", *rules])


def queries(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_strict_rules_leak_nothing_with_the_daemon_up_or_down(leaklab: LeakLab, mode: str, loader: str) -> None:
    lab = leaklab.lab
    port = next_port()
    config_path = lab.file(f"leak-{mode}-{loader}.conf", config_text(port, mode))

    # Control: with no rules, the capture must see a direct packet as a leak.
    with Capture(leaklab, f"{mode}-{loader}-control") as control:
        lab.client.call(lambda: _udp(WEB4, 443, b"control"))
    assert control.leaks(), "the capture saw no leak without rules: it would prove nothing"
    decoy_before = len(queries(leaklab.decoy_log))

    rules = Rules(lab, loader, config_path)
    daemon: Daemon | None = None
    try:
        rules.load()
        daemon = start_daemon(lab, f"leak-{mode}-{loader}", config_path.read_text(), port=port, redirect=False)

        # 1. The daemon is up: TCP goes through the proxy, everything else is refused.
        with Capture(leaklab, f"{mode}-{loader}-up") as up:
            seen_up = generate(leaklab)
        assert up.leaks() == [], report(up, seen_up)
        assert up.to_proxy(), "no packet reached the proxy: the rules diverted nothing?\n" + report(up, seen_up)
        for label in ("tcp4", "tcp6"):
            code, body, _ = seen_up.fetched[label]
            assert code == 0 and body == peers.INDEX.encode(), report(up, seen_up)
        assert seen_up.fetched["tcp4 as the daemon's user"][0] != 0, "the daemon's user went out directly"
        code, answer = seen_up.lookups["dns4"]
        assert code == 0 and RESOLVER_ANSWER in answer and DECOY_ANSWER not in answer, report(up, seen_up)
        assert seen_up.lookups["dns6"][0] != 0, "IPv6 DNS must be refused: the resolver is IPv4"

        # 2. The daemon is down: diverted connections fail at once, nothing goes out.
        daemon.stop()
        with Capture(leaklab, f"{mode}-{loader}-down") as down:
            seen_down = generate(leaklab)
        assert down.leaks() == [], report(down, seen_down)
        assert down.to_proxy() == [], "with the daemon down nothing should reach the proxy"
        for label in ("tcp4", "tcp6"):
            code, _, seconds = seen_down.fetched[label]
            assert code != 0, f"{label}: reached the web with the daemon down\n" + report(down, seen_down)
            # REDIRECT sends it to a closed port: a reset at once. Under TPROXY
            # a packet with no socket to take it is dropped (iptables' target)
            # or delivered nowhere, so the connection may time out instead.
            if mode == "redirect":
                assert seconds < 5, f"{label}: should fail fast, not hang\n" + report(down, seen_down)
        code, answer = seen_down.lookups["dns4"]
        assert code == 0 and RESOLVER_ANSWER in answer, "the resolver does not depend on the daemon"

        # 3. The decoy never heard a query; the resolver heard ours.
        assert queries(leaklab.decoy_log)[decoy_before:] == []
        assert any(line.startswith(CLIENT4) or line.startswith("127.") for line in queries(leaklab.resolver_log))
    finally:
        if daemon is not None:
            daemon.stop()
        rules.unload()
