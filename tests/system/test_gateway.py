"""Gateway mode end to end: LAN clients behind a router reach the web only through the upstream.

The lab is gateway_lab.py's: a router namespace running the daemon and the
rules of ``--print-rules ... --strict`` for ``lan_interfaces = br0``, three
LAN namespaces on the bridge (two IPv4+IPv6 VMs and an IPv4 sandbox), dante
with pam.username upstream (its log names each session's username, so the
isolation credentials can be read there), nginx behind it, and a decoy
resolver next to dante that the LAN's resolv.conf names.

For each firewall back-end (nft, and iptables-legacy's restore tools) one
test, in order:

1. control: with no rules and forwarding on, a LAN packet does leave
   through the uplink, so the capture would see a leak;
2. the rules are loaded and the daemon (isolation = client) started;
3. every LAN client fetches pages with curl and wget (IPv4, and IPv6 on the
   VMs), looks a name up, sends DNS, DNS over TCP, QUIC-like UDP, pings and
   an unassigned IP protocol; tcpdump on the router's uplink counts every
   frame the router sends, and everything that is not the daemon's own
   connection to dante is a leak, counted per protocol;
4. dante's log gives each client address's usernames: stable per address,
   never shared between addresses;
5. a LAN client that connects straight to the daemon's port is refused by
   the loop guard, and the router's other services are closed to the LAN;
6. the daemon's log, at the default level, holds no LAN address;
7. the daemon stops, and the traffic of step 3 again leaks nothing;
8. the rules are unloaded, and the ruleset is byte for byte what it was.

The isolation table and the leak counts are printed (pytest -s shows them).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from metaproxy.config import load
from metaproxy.firewall import render
from tests.system import peers
from tests.system.daemon import Daemon, daemon_section, next_port, start_daemon
from tests.system.gateway_lab import LAN4, LAN_NET4, LAN_NET6, GatewayLab, LanClient
from tests.system.lab import CLIENT4, GATEWAY4, GATEWAY6, PYTHON, SYSPATH, WEB4, WEB6, LabError, Namespace, \
    Process, url_host
from tests.system.test_firewall_leaks import DNS_RESPONDER, _icmp_echo, _query, _raw, _tcp, _udp, _wait_for
from tests.preconditions import unmet

REQUIRED = ["ip", "nft", "iptables-legacy-restore", "ip6tables-legacy-restore", "iptables-legacy-save",
            "ip6tables-legacy-save", "tcpdump", "danted", "nginx", "curl", "wget", "getent", "unshare"]

WEB_PORT = 8080
DANTE = (GATEWAY4, peers.DANTE_AUTH_PORT)
RESOLVER = (LAN4, 5353)                  # Tor's DNSPort on the router's LAN address
RESOLVER_ANSWER = "203.0.113.77"
DECOY_ANSWER = "203.0.113.66"
NAME = "gateway-test.example"
SERVICE_PORT = 2222                      # another service of the router, closed to the LAN
DAEMON_TO_DANTE = f"src host {CLIENT4} and dst host {DANTE[0]} and tcp dst port {DANTE[1]}"
# What a leak is, by protocol; "all" is the sum that must be 0.
LEAK_FILTERS = {
    "all": f"not ({DAEMON_TO_DANTE})",
    "from a LAN address": f"src net {LAN_NET4} or src net {LAN_NET6}",
    "tcp": f"tcp and not ({DAEMON_TO_DANTE})",
    "dns": "port 53",
    "udp (quic-like)": "udp and not port 53",
    "icmp": "icmp or icmp6",
    "ipv6": "ip6",
    "other ip protocols": "ip and not tcp and not udp and not icmp",
}
LOADERS = {
    "nftables": [("nftables", ["nft", "-f", "-"])],
    "iptables-legacy": [("iptables", ["iptables-legacy-restore", "--noflush"]),
                        ("ip6tables", ["ip6tables-legacy-restore", "--noflush"])],
}
# dante: "pass(1): tcp/connect [: pam.username%NAME@192.0.2.1.PORT 192.0.2.2.1081 -> ... 198.51.100.2.8080"
_SESSION = re.compile(rf"tcp/connect \[: pam\.username%(?P<user>.*?)@{re.escape(CLIENT4)}\.\d+ \S+ -> \S+ "
                      rf"\S+\.{WEB_PORT}\s*$")


def _precondition() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "the gateway tests need root (network namespaces, netfilter, tcpdump)"
    elif missing := [b for b in REQUIRED if shutil.which(b, path=SYSPATH) is None]:
        reason = f"missing programs: {', '.join(missing)} (see .ci/apt-packages; `make deps` installs them)"
    unmet(reason)


@dataclass
class World:
    lab: GatewayLab
    uplink_mac: str
    dante_log: Path
    decoy_log: Path
    processes: dict[str, Process] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    _precondition()
    lab = GatewayLab()
    try:
        lab.build()
        processes = {"dante": peers.start_dante_auth(lab), "nginx": peers.start_nginx(lab, [WEB_PORT])[0]}
        decoy_log = lab.tmp / "decoy.queries"
        processes["resolver"] = _responder(lab, lab.router, "resolver", RESOLVER_ANSWER, lab.tmp / "resolver.queries",
                                           [f"{RESOLVER[0]}:{RESOLVER[1]}"])
        processes["decoy"] = _responder(lab, lab.gateway, "decoy", DECOY_ANSWER, decoy_log,
                                        [f"{GATEWAY4}:53", f"[{GATEWAY6}]:53"])
        processes["service"] = lab.router.spawn("service", ["socat", f"TCP-LISTEN:{SERVICE_PORT},fork,reuseaddr",
                                                            "SYSTEM:echo router-service"])
        lab.router.wait_tcp(LAN4, SERVICE_PORT, process=processes["service"])
        mac = lab.router.run(["cat", "/sys/class/net/to-gw/address"]).stdout.decode().strip()
        yield World(lab, mac, lab.tmp / "dante-auth.log", decoy_log, processes)
    finally:
        lab.close()


def _responder(lab: GatewayLab, ns: Namespace, name: str, answer: str, log: Path, listen: list[str]) -> Process:
    log.touch()
    process = ns.spawn(name, [PYTHON, "-c", DNS_RESPONDER, answer, str(log), *listen])
    _wait_for(lambda: "ready" in process.output() or not process.alive(), 10, f"{name} to start")
    if not process.alive():
        raise LabError(f"{name} exited:\n{process.output()}")
    return process


# ---- rules, capture, traffic --------------------------------------------------------------

def _ruleset(lab: GatewayLab, loader: str) -> str:
    """The router's whole ruleset as the loader's tools print it, without their timestamps.

    iptables-legacy lists a table only once something used it: the tables are
    touched first, so that "before" and "after" list the same ones.
    """
    if loader == "nftables":
        return lab.router.run(["nft", "list", "ruleset"]).stdout.decode()
    for tool in ("iptables-legacy-restore", "ip6tables-legacy-restore"):
        lab.router.run([tool, "--noflush"], input=b"*filter\nCOMMIT\n*mangle\nCOMMIT\n*nat\nCOMMIT\n")
    text = "".join(lab.router.run([tool]).stdout.decode() for tool in ("iptables-legacy-save", "ip6tables-legacy-save"))
    # Timestamps and the built-in chains' packet counters change; the rules must not.
    return "\n".join(re.sub(r"\[\d+:\d+\]$", "[-]", line) for line in text.splitlines() if not line.startswith("#"))


def _load(lab: GatewayLab, loader: str, config_path: Path, *, unload: bool = False) -> None:
    config = load(str(config_path))
    for backend, argv in LOADERS[loader]:
        lab.router.run(argv, input=render(config, backend, strict=True, unload=unload).encode())


class Capture:
    """tcpdump in the upstream namespace on its veth to the router: every frame the router sends."""

    def __init__(self, world: World, name: str) -> None:
        self.world, self.name, self.pcap = world, name, world.lab.tmp / f"{name}.pcap"
        self.process: Process | None = None

    def __enter__(self) -> "Capture":
        argv = ["tcpdump", "-i", "to-client", "-n", "-U", "--immediate-mode", "-Z", "root", "-c", "100000",
                "-w", str(self.pcap), f"ether src {self.world.uplink_mac} and not arp"]
        process = self.process = self.world.lab.gateway.spawn(f"tcpdump-{self.name}", argv)
        _wait_for(lambda: "listening on" in process.output() or not process.alive(), 10, "tcpdump to listen")
        if not process.alive():
            raise LabError(f"tcpdump exited:\n{process.output()}")
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # the last frames reach the capture
        if self.process is not None:
            self.process.stop()

    def packets(self, expression: str) -> list[str]:
        proc = self.world.lab.gateway.run(["tcpdump", "-r", str(self.pcap), "-n", expression], check=False)
        if proc.returncode != 0:
            raise LabError(f"tcpdump -r failed:\n{proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode(errors="replace").splitlines()

    def counts(self) -> dict[str, int]:
        return {name: len(self.packets(expression)) for name, expression in LEAK_FILTERS.items()}


def _fetch(ns: Namespace, tool: str, host: str) -> tuple[int, bytes]:
    url = f"http://{url_host(host)}:{WEB_PORT}/index.html"
    argv = (["curl", "-q", "--silent", "--show-error", "--fail", "--noproxy", "*", "--max-time", "8", url]
            if tool == "curl" else ["wget", "--no-config", "--quiet", "--tries=1", "--timeout=8", "-O", "-", url])
    try:
        proc = ns.run(argv, check=False, timeout=15)
    except subprocess.TimeoutExpired:
        return -1, b""
    return proc.returncode, proc.stdout


def _lookup(world: World, client: LanClient, nameserver: str) -> tuple[int, str]:
    """getent in the LAN client, with a resolv.conf naming the decoy, bind-mounted privately."""
    resolv = world.lab.file(f"resolv-{nameserver.replace(':', '_')}.conf",
                            f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec getent ahostsv4 "$1"', str(resolv), NAME]
    try:
        proc = client.ns.run(argv, check=False, timeout=15)
    except subprocess.TimeoutExpired:
        return -1, "getent timed out"
    return proc.returncode, proc.stdout.decode(errors="replace")


@dataclass
class Seen:
    fetched: dict[str, int] = field(default_factory=dict)           # "vm1 curl 203..." -> exit code
    lookups: dict[str, tuple[int, str]] = field(default_factory=dict)
    sockets: dict[str, str] = field(default_factory=dict)
    usernames: dict[str, list[str]] = field(default_factory=dict)    # "client address" -> dante usernames


def _generate(world: World, *, expect_sessions: bool) -> Seen:
    seen = Seen()
    for client in world.lab.lan:
        for address, dest in ((client.ipv4, WEB4), *(((client.ipv6, WEB6),) if client.ipv6 else ())):
            mark = len(world.dante_log.read_text(errors="replace"))
            for tool in ("curl", "curl", "wget"):
                seen.fetched[f"{client.name} {tool} from {address}"] = _fetch(client.ns, tool, dest)[0]
            if expect_sessions:
                seen.usernames[f"{client.name:<8} {address}"] = _sessions(world.dante_log, mark, 3)
        ns = client.ns
        seen.lookups[f"{client.name} dns4"] = _lookup(world, client, GATEWAY4)
        calls = {"dns over tcp": lambda: _tcp(GATEWAY4, 53),
                 "dns4 raw udp": lambda: _udp(GATEWAY4, 53, _query(NAME)),
                 "quic4": lambda: _udp(WEB4, 443, b"\xc3\x00\x00\x00\x01" + b"\x00" * 1195),
                 "ping4": lambda: _raw(socket.AF_INET, socket.IPPROTO_ICMP, WEB4, _icmp_echo(8)),
                 "ip proto 253": lambda: _raw(socket.AF_INET, 253, WEB4, b"leak?")}
        if client.ipv6:
            calls |= {"dns6 raw udp": lambda: _udp(GATEWAY6, 53, _query(NAME)),
                      "quic6": lambda: _udp(WEB6, 443, b"\xc3\x00\x00\x00\x01" + b"\x00" * 1195),
                      "ping6": lambda: _raw(socket.AF_INET6, socket.IPPROTO_ICMPV6, WEB6, _icmp_echo(128))}
        for label, call in calls.items():
            seen.sockets[f"{client.name} {label}"] = ns.call(call)
    return seen


def _sessions(log: Path, mark: int, count: int, timeout: float = 5) -> list[str]:
    found: list[str] = []
    for _ in range(int(timeout / 0.05) + 1):
        found = [m.group("user") for m in map(_SESSION.search, log.read_text(errors="replace")[mark:].splitlines())
                 if m]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"dante logged {len(found)} of {count} sessions:\n{log.read_text(errors='replace')[mark:]}")


def _table(seen: Seen) -> str:
    rows = [f"{'client   address':<27} {'connections':>11}  {'usernames':>9}  username"]
    for client, names in seen.usernames.items():
        rows.append(f"{client:<27} {len(names):>11}  {len(set(names)):>9}  {names[0]}")
    return "\n".join(rows)


def _report(capture: Capture, seen: Seen, daemon: Daemon | None) -> str:
    return "\n".join(["leaked frames:", *capture.packets(LEAK_FILTERS["all"]),
                      "what the clients saw:", *(f"  {k}: exit {v}" for k, v in seen.fetched.items()),
                      *(f"  {k}: {v}" for k, v in seen.lookups.items()), *(f"  {k}: {v}" for k, v in seen.sockets.items()),
                      "daemon log:", daemon.log()[-3000:] if daemon else ""])


def _config(port: int) -> str:
    return daemon_section(port, connect_timeout=5).replace("listen = 127.0.0.1, ::1", "listen = 0.0.0.0, ::") + f"""\
[upstreams]
    [[dante]]
    type = socks5
    address = {DANTE[0]}:{DANTE[1]}
    isolation = client
[routes]
* = dante
[firewall]
dns = {RESOLVER[0]}:{RESOLVER[1]}
lan_interfaces = br0
"""


def _direct(ns: Namespace, host: str, port: int) -> str:
    """Connect straight to host:port and say what happened (bounded by timeouts)."""
    def attempt() -> str:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            try:
                s.connect((host, port))
                data = s.recv(100)
                return f"connected, read {data!r}"
            except OSError as e:
                return f"{type(e).__name__}"
    return ns.call(attempt)


# ---- the test -----------------------------------------------------------------------------

@pytest.mark.parametrize("loader", list(LOADERS))
def test_gateway_diverts_isolates_per_client_and_leaks_nothing_up_or_down(world: World, loader: str) -> None:
    lab = world.lab
    vm1 = lab.lan[0]
    port = next_port()
    config_path = lab.file(f"gateway-{loader}.conf", _config(port))

    with Capture(world, f"{loader}-control") as control:
        vm1.ns.call(lambda: _udp(WEB4, 443, b"control"))
    assert control.packets(LEAK_FILTERS["from a LAN address"]), "no leak without rules: the capture proves nothing"
    assert "router-service" in _direct(vm1.ns, LAN4, SERVICE_PORT), "the router's service must exist for the check"

    before = _ruleset(lab, loader)
    decoy_before = len(world.decoy_log.read_text().splitlines())
    daemon: Daemon | None = None
    loaded = False
    try:
        _load(lab, loader, config_path)
        loaded = True
        daemon = start_daemon(lab, f"gateway-{loader}", config_path.read_text(), port=port, redirect=False)

        # 3 and 4: the daemon is up.
        with Capture(world, f"{loader}-up") as up:
            seen = _generate(world, expect_sessions=True)
        counts = up.counts()
        print(f"\n[{loader}] daemon up, leaked frames per protocol: {counts}")
        print(f"[{loader}] isolation = client, one run:\n{_table(seen)}")
        assert counts["all"] == 0, _report(up, seen, daemon)
        assert up.packets(DAEMON_TO_DANTE), "nothing reached dante: the rules diverted nothing?"
        assert all(code == 0 for code in seen.fetched.values()), _report(up, seen, daemon)
        for client in lab.lan:
            code, answer = seen.lookups[f"{client.name} dns4"]
            assert code == 0 and RESOLVER_ANSWER in answer and DECOY_ANSWER not in answer, _report(up, seen, daemon)
        firsts = []
        for address, names in seen.usernames.items():
            assert len(set(names)) == 1 and names[0], f"{address}: its connections carried {names}"
            firsts.append(names[0])
        assert len(set(firsts)) == len(firsts) == 5, f"client addresses share usernames:\n{_table(seen)}"

        # 5: no way around the daemon, and nothing else of the router is open.
        mark = daemon.mark()
        direct = _direct(vm1.ns, LAN4, port)
        assert "read b''" in direct or "Reset" in direct, f"a direct connection to the daemon got {direct}"
        assert "loop guard" in daemon.wait_log("loop guard", since=mark), daemon.log_since(mark)
        assert "router-service" not in _direct(vm1.ns, LAN4, SERVICE_PORT)
        assert "ConnectionRefused" in _direct(vm1.ns, LAN4, SERVICE_PORT)

        # 6: no LAN address in the default-level log.
        log = daemon.log()
        leaked = [a for c in lab.lan for a in c.addresses if a in log] + [n for n in ("2001:db8:3:",) if n in log]
        assert not leaked, f"the daemon's log names LAN addresses {leaked}:\n{log}"

        # 7: the daemon is down; everything fails closed.
        daemon.stop()
        with Capture(world, f"{loader}-down") as down:
            seen_down = _generate(world, expect_sessions=False)
        counts_down = down.counts()
        print(f"[{loader}] daemon down, leaked frames per protocol: {counts_down}")
        assert counts_down["all"] == 0, _report(down, seen_down, None)
        assert all(code != 0 for code in seen_down.fetched.values()), _report(down, seen_down, None)
        assert len(world.decoy_log.read_text().splitlines()) == decoy_before, "the decoy resolver heard a query"
    finally:
        if daemon is not None:
            daemon.stop()
        if loaded:
            _load(lab, loader, config_path, unload=True)
    # 8: the removal leaves the ruleset as it was, byte for byte.
    assert _ruleset(lab, loader) == before
