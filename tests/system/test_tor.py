"""The daemon in front of a real Tor, on a private Tor network the tests start.

tor_network.py runs three authorities, a relay, an exit, an onion service and
a Tor client in the gateway namespace. The daemon runs in the client namespace
as usual (root, dropping to nobody, seccomp enforcing) with the Tor client as
its upstream, over TCP and over a Unix socket laid out as Debian's
/run/tor/socks. What Tor itself reports on its control port (STREAM events:
the circuit each stream used and the SOCKS username Tor saw) is the witness.

The .onion tests take the product path: the daemon's own ruleset
(``--print-rules iptables|ip6tables --strict``, with ``[firewall] dns`` naming
Tor's DNSPort and the default ``tor_virtual_networks``) is loaded into the
client namespace with iptables-restore --noflush for the test and removed
after it, leaving the tables as they were. The namespace's resolv.conf names
a resolver nobody runs: only the rules' DNS redirection reaches Tor's
DNSPort, which maps the onion to a virtual address, and only the rules'
diversion of Tor's virtual range brings the connection to the daemon.

The whole module is bounded: the network must be up in BOOTSTRAP_TIMEOUT,
every fetch has a timeout, and the module's wall time is printed at the end.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.preconditions import unmet
from tests.system import clients
from tests.system.daemon import Daemon, daemon_section, next_port, print_rules, start_daemon
from tests.system.lab import GATEWAY4, WEB4, Lab, clean_env
from tests.system.peers import INDEX, World
from tests.system.tor_network import (DNS_PORT, MISSING_ONION, NOBODYS_RESOLVER, VIRTUAL_NET4, StreamEvent,
                                      StreamWatch, TorNetwork, tor_available)

BOOTSTRAP_TIMEOUT = 120
MODULE_BUDGET = 180  # seconds for the whole module, bootstrap included
ONION_WEB_PORT = 8001
# Destination port -> upstream of the daemon under test; nginx listens on all of them,
# and the exit's policy accepts EXIT_ACCEPT only.
ISO_PORTS = {"connection": 8021, "destination": 8022, "user": 8023, "none": 8024}
DESTINATION_OTHER = 8025
# Two sites routed to an upstream with neither isolation nor connect_timeout set: the
# shipped defaults (user, destination every 600 s; socks5's 120 s).
DEFAULTS_PORTS = (8026, 8007)
UNIX_PORT = 8003
EXIT_ACCEPT = "8000-8999"
CLOSED_PORT = 8999          # accepted by the exit, nothing listens there
POLICY_REJECTED_PORT = 47123  # nginx listens, the exit's policy rejects it
UNREACHABLE_HOST = "198.51.100.99"  # on the web link, nobody has it
BULK_BYTES = 4 * 1024 * 1024
PARALLEL = 24
TABLE: dict[str, str] = {}
VIRTUAL_ADDRESS = re.compile(r"\b10\.(?:19[2-9]|2[0-5][0-9])\.[0-9]+\.[0-9]+")  # inside 10.192.0.0/10


def _config(port: int, socks: str, unix_socket: Path) -> str:
    upstreams = "".join(
        f"    [[tor_{mode}]]\n    type = socks5\n    address = {socks}\n"
        f"    isolation = {mode}\n    connect_timeout = 60\n" for mode in ISO_PORTS)
    upstreams += f"    [[tor_defaults]]\n    type = socks5\n    address = {socks}\n"
    upstreams += (f"    [[tor_unix]]\n    type = socks5\n    address = unix:{unix_socket}\n"
                  "    isolation = connection\n    connect_timeout = 60\n")
    routes = "".join(f"{p} = tor_{mode}\n" for mode, p in ISO_PORTS.items())
    routes += "".join(f"{p} = tor_defaults\n" for p in DEFAULTS_PORTS)
    routes += f"{DESTINATION_OTHER} = tor_destination\n{UNIX_PORT} = tor_unix\n* = tor_connection\n"
    # For --print-rules: DNS to Tor's DNSPort; tor_virtual_networks keeps its default (Tor's).
    firewall = f"[firewall]\ndns = {GATEWAY4}:{DNS_PORT}\n"
    return daemon_section(port) + "[upstreams]\n" + upstreams + "[routes]\n" + routes + firewall


# ---- fixtures ---------------------------------------------------------------------------------

def _precondition() -> None:
    reason = tor_available()
    unmet(reason)


class Tor:
    """The network, the daemon in front of it, and the control-port witness."""

    def __init__(self, world: World, network: TorNetwork, daemon: Daemon, began: float) -> None:
        self.world, self.network, self.daemon, self.began = world, network, daemon, began
        self.watch = StreamWatch(network)

    def rewatch(self) -> None:
        self.watch.close()
        self.watch = StreamWatch(self.network)


def _tables(lab: Lab) -> str:
    """iptables-save and ip6tables-save of the client, without comments and counters, and
    without tables that hold nothing (loading creates an empty filter table that was not there)."""
    saved = []
    for tool in ("iptables-save", "ip6tables-save"):
        text = lab.client.run([tool]).stdout.decode()
        for table in re.split(r"^(?=\*)", text, flags=re.M):
            lines = [re.sub(r" \[\d+:\d+\]$", "", line) for line in table.splitlines()
                     if line and not line.startswith("#")]
            if any(not (line.startswith((":", "*")) and line.endswith(" ACCEPT") or line.startswith("*")
                        or line == "COMMIT") for line in lines):
                saved += [f"{tool} {line}" for line in lines]
    return "\n".join(saved)


@pytest.fixture
def product_rules(tor: Tor) -> Iterator[str]:
    """The daemon's strict ruleset, loaded with iptables-restore --noflush for one test.

    Yields the IPv4 ruleset's text. Removed afterwards with its own --unload
    output, and the tables must then be as before, byte for byte (counters
    aside: traffic moves them).
    """
    lab, config = tor.world.lab, tor.daemon.config
    before = _tables(lab)
    loaded: list[str] = []
    texts = {}
    try:
        for backend in ("iptables", "ip6tables"):
            texts[backend] = print_rules(config, backend)
            lab.client.run([f"{backend}-restore", "--noflush"], input=texts[backend])
            loaded.append(backend)
        yield texts["iptables"].decode()
    finally:
        for backend in reversed(loaded):
            lab.client.run([f"{backend}-restore", "--noflush"], input=print_rules(config, backend, unload=True),
                           check=False)
    after = _tables(lab)
    assert after == before, f"--unload left the client's tables changed:\nbefore:\n{before}\nafter:\n{after}"


@pytest.fixture(scope="module")
def tor_world(world: World) -> Iterator[Tor]:
    """The private network, bootstrapped; the daemon; the resolv.conf and route for .onion."""
    _precondition()
    began = time.monotonic()
    lab = world.lab
    network = TorNetwork(lab, lab.gateway, WEB4, ONION_WEB_PORT, (EXIT_ACCEPT,))
    netns_etc = Path("/etc/netns") / lab.client.name
    daemon: Daemon | None = None
    tor: Tor | None = None
    try:
        network.start(timeout=BOOTSTRAP_TIMEOUT)
        print(f"\n[tor] private network up in {time.monotonic() - began:.1f}s, onion {network.onion}")
        port = next_port()
        daemon = start_daemon(lab, f"metaproxy-tor-{port}", _config(port, f"{GATEWAY4}:9050", network.unix_socket),
                              port=port, redirect=False)
        # Tor's virtual addresses need a route, as on a host with a default route (the lab
        # has none), or connect() fails with ENETUNREACH before the nat hook. The resolver
        # is nobody's: the strict rules send DNS to Tor's DNSPort ([firewall] dns).
        lab.client.run(["ip", "route", "replace", VIRTUAL_NET4, "via", GATEWAY4])
        netns_etc.mkdir(parents=True, exist_ok=True)
        (netns_etc / "resolv.conf").write_text(f"nameserver {NOBODYS_RESOLVER}\n")
        tor = Tor(world, network, daemon, began)
        yield tor
    finally:
        if tor is not None:
            tor.watch.close()
        if daemon is not None:
            daemon.stop()
        lab.client.run(["ip", "route", "del", VIRTUAL_NET4], check=False)
        if netns_etc.exists():
            (netns_etc / "resolv.conf").unlink(missing_ok=True)
            netns_etc.rmdir()
        network.stop()
        wall = time.monotonic() - began
        print("\n[tor] isolation mode -> circuits seen (one run):")
        for line in TABLE.values():
            print(f"[tor]   {line}")
        print(f"[tor] Tor tier wall time: {wall:.1f}s (budget {MODULE_BUDGET}s)")


@pytest.fixture
def tor(tor_world: Tor) -> Tor:
    """tor_world with the lab's REDIRECT rules pointing at its daemon (other modules move them)."""
    if not tor_world.daemon.alive():
        pytest.fail(f"the Tor tier's daemon died:\n{tor_world.daemon.log()[-4000:]}", pytrace=False)
    spent = time.monotonic() - tor_world.began
    if spent > MODULE_BUDGET:
        pytest.fail(f"the Tor tier has used {spent:.0f}s, over its budget of {MODULE_BUDGET}s", pytrace=False)
    tor_world.world.lab.redirect_to(tor_world.daemon.port)
    return tor_world


# ---- helpers ------------------------------------------------------------------------------------

def _curl(tor: Tor, address: str, port: int, *, as_nobody: bool = False, timeout: float = 30,
          out: str | None = None) -> clients.Fetched:
    return clients.curl(tor.world.client, clients.url(address, port), as_nobody=as_nobody,
                        timeout=timeout, out=out)


def _streams_to(events: list[StreamEvent], port: int) -> list[StreamEvent]:
    return [e for e in events if e.target.endswith(f":{port}")]


def _succeeded(tor: Tor, mark: tuple[int, int], port: int, count: int) -> list[StreamEvent]:
    found = _streams_to(tor.watch.succeeded(mark, count, timeout=10), port)
    assert len(found) >= count, f"Tor reported {len(found)} of {count} streams to port {port}: {found}"
    return found


def _record(mode: str, events: list[StreamEvent], note: str = "") -> None:
    circuits = len({e.circuit for e in events})
    users = len({e.username for e in events})
    line = (f"{mode:<12} {len(events)} connections -> {circuits} circuit(s), "
            f"{users} SOCKS username(s) {note}").rstrip()
    TABLE[mode] = line
    print(f"\n[tor] {line}: circuits {[e.circuit for e in events]}")


def _assert_private(tor: Tor, mark: int, *secrets: str) -> None:
    """No secret, and no address of Tor's virtual range, in the daemon's log since mark."""
    log = tor.daemon.log_since(mark)
    for secret in secrets:
        assert secret not in log, f"the daemon's log names {secret!r} at the default level:\n{log}"
    virtual = VIRTUAL_ADDRESS.search(log)
    assert virtual is None, f"the daemon's log names the virtual address {virtual.group()}:\n{log}"


# ---- relay through Tor ----------------------------------------------------------------------------

def test_curl_through_tor_tcp_socksport_reaches_the_web_via_the_exit(tor: Tor) -> None:
    """A plain curl, redirected, goes daemon -> Tor's TCP SocksPort -> exit -> nginx."""
    mark = tor.watch.mark()
    got = _curl(tor, WEB4, ISO_PORTS["connection"])
    assert got.ok, f"curl failed: {got.stderr}\n{tor.daemon.log()[-2000:]}"
    assert got.body.decode() == INDEX
    stream = _succeeded(tor, mark, ISO_PORTS["connection"], 1)[0]
    assert stream.username, f"Tor saw no SOCKS username with isolation = connection: {stream}"


def test_curl_through_tor_unix_socksport_debian_layout(tor: Tor) -> None:
    """The upstream unix:<dir>/socks (a 02755 directory, a WorldWritable socket, as
    Debian's /run/tor/socks) is reached by the daemon running as nobody."""
    mode = tor.network.run_dir.stat().st_mode & 0o7777
    assert mode == 0o2755, f"the socket directory is {oct(mode)}, Debian's /run/tor is 02755"
    mark = tor.watch.mark()
    got = _curl(tor, WEB4, UNIX_PORT)
    assert got.ok, f"curl via the Unix SocksPort failed: {got.stderr}\n{tor.daemon.log()[-2000:]}"
    assert got.body.decode() == INDEX
    _succeeded(tor, mark, UNIX_PORT, 1)


# ---- isolation, as Tor sees it -------------------------------------------------------------------

def test_isolation_connection_gives_every_connection_its_own_circuit(tor: Tor) -> None:
    """isolation = connection: four connections to one destination use four circuits."""
    port = ISO_PORTS["connection"]
    mark = tor.watch.mark()
    for _ in range(4):
        assert _curl(tor, WEB4, port).ok
    events = _succeeded(tor, mark, port, 4)
    _record("connection", events)
    assert len({e.username for e in events}) == 4, f"usernames Tor saw: {[e.username for e in events]}"
    assert len({e.circuit for e in events}) == 4, f"circuits: {[e.circuit for e in events]}"


def test_isolation_destination_alternating_gives_a_b_a_b(tor: Tor) -> None:
    """isolation = destination: A B A B uses circuits x y x y with x != y."""
    a, b = ISO_PORTS["destination"], DESTINATION_OTHER
    mark = tor.watch.mark()
    order = [a, b, a, b]
    for port in order:
        assert _curl(tor, WEB4, port).ok
    events = tor.watch.succeeded(mark, 4)
    by_port = [next(e for e in events[i:] if e.target.endswith(f":{p}")) for i, p in enumerate(order)]
    circuits = [e.circuit for e in by_port]
    _record("destination", events, "(A B A B)")
    assert circuits[0] == circuits[2] and circuits[1] == circuits[3] and circuits[0] != circuits[1], \
        f"expected x y x y, Tor used {circuits} (usernames {[e.username for e in by_port]})"


def test_isolation_user_separates_two_local_uids(tor: Tor) -> None:
    """isolation = user: root's connections share a circuit, nobody's share another."""
    port = ISO_PORTS["user"]
    mark = tor.watch.mark()
    for nobody in (False, False, True, True):
        assert _curl(tor, WEB4, port, as_nobody=nobody).ok
    events = _succeeded(tor, mark, port, 4)
    _record("user", events, "(2 uids)")
    root, nobody = events[:2], events[2:]
    assert root[0].circuit == root[1].circuit and nobody[0].circuit == nobody[1].circuit, \
        f"one uid, two circuits: {[e.circuit for e in events]}"
    assert root[0].circuit != nobody[0].circuit and root[0].username != nobody[0].username, \
        f"uid 0 and nobody share a circuit or username: {events}"


def test_isolation_default_user_and_destination_gives_each_user_and_site_a_circuit(tor: Tor) -> None:
    """The default, isolation = user, destination: root and nobody each fetch from two
    sites; the four (uid, site) pairs use four circuits with four usernames, and a pair
    that comes back uses its circuit again. No circuit per connection, no sharing across
    users or sites."""
    a, b = DEFAULTS_PORTS
    order = [(False, a), (False, b), (True, a), (True, b), (False, a), (True, b)]
    mark = tor.watch.mark()
    for nobody, port in order:
        got = _curl(tor, WEB4, port, as_nobody=nobody)
        assert got.ok, f"{got.stderr}\n{tor.daemon.log()[-2000:]}"
    events = [e for e in tor.watch.succeeded(mark, len(order)) if e.target.endswith((f":{a}", f":{b}"))]
    assert len(events) >= len(order), f"Tor reported {events}"
    events = events[:len(order)]
    for event, (_, port) in zip(events, order):
        assert event.target.endswith(f":{port}"), (events, order)
    _record("user, destination", events, "(2 uids x 2 sites, the default)")
    circuits, users = [e.circuit for e in events], [e.username for e in events]
    assert len(set(circuits[:4])) == 4 and len(set(users[:4])) == 4, f"circuits {circuits}, usernames {users}"
    assert circuits[4] == circuits[0] and circuits[5] == circuits[3], f"a pair changed circuit: {circuits}"
    assert users[4] == users[0] and users[5] == users[3], f"a pair changed username: {users}"


def test_isolation_none_shares_one_circuit(tor: Tor) -> None:
    """isolation = none: no credentials, so Tor puts every connection on one circuit."""
    port = ISO_PORTS["none"]
    mark = tor.watch.mark()
    for nobody in (False, True, False, True):
        assert _curl(tor, WEB4, port, as_nobody=nobody).ok
    events = _succeeded(tor, mark, port, 4)
    _record("none", events)
    assert all(e.username is None for e in events), f"Tor saw usernames: {[e.username for e in events]}"
    assert len({e.circuit for e in events}) == 1, f"circuits: {[e.circuit for e in events]}"


# ---- .onion for a program that knows nothing of Tor ----------------------------------------------

def test_onion_by_name_through_dnsport_and_the_daemons_own_rules(tor: Tor, product_rules: str) -> None:
    """wget http://<onion>/ with no proxy settings, under the daemon's own --print-rules --strict:
    the rules send the DNS query (to a resolver nobody runs) to Tor's DNSPort, which answers
    with a virtual address in 10.192.0.0/10; the rules divert TCP to it to the daemon before
    10.0.0.0/8 is exempted; Tor maps it back to the onion service.
    (curl refuses to resolve .onion names itself, RFC 7686; wget asks the resolver.)"""
    assert f"-d {VIRTUAL_NET4} -p tcp -j REDIRECT --to-ports {tor.daemon.port}" in product_rules
    assert f"-p udp -m udp --dport 53 -j DNAT --to-destination {GATEWAY4}:{DNS_PORT}" in product_rules
    resolved = tor.world.lab.client.run(["getent", "ahostsv4", tor.network.onion], check=False, timeout=20)
    virtual = VIRTUAL_ADDRESS.search(resolved.stdout.decode())
    assert virtual, f"{tor.network.onion} did not resolve to Tor's virtual range: {resolved.stdout!r}"
    mark, log_mark = tor.watch.mark(), tor.daemon.mark()
    got = clients.wget(tor.world.client, f"http://{tor.network.onion}/", timeout=60)
    assert got.ok, f"wget of the onion failed: {got.stderr}\n{tor.daemon.log_since(log_mark)}"
    assert got.body.decode() == INDEX
    events = [e for e in tor.watch.succeeded(mark, 1, timeout=10) if e.target.startswith(tor.network.onion)]
    assert events, f"Tor reported no stream to {tor.network.onion}: {tor.watch.streams[mark[0]:]}"
    print(f"\n[tor] {tor.network.onion} -> {virtual.group()} (Tor's DNSPort), fetched through the daemon's "
          f"own rules; Tor's stream {events[0].stream} on circuit {events[0].circuit}")
    _assert_private(tor, log_mark, tor.network.onion, virtual.group())


# ---- refusals, named ------------------------------------------------------------------------------

def _refused(tor: Tor, fetch: "subprocess.CompletedProcess[bytes] | clients.Fetched", log_mark: int,
             expected: str, secrets: tuple[str, ...]) -> str:
    assert not fetch.ok, "the fetch succeeded"
    log = tor.daemon.wait_log(expected, since=log_mark, timeout=10)
    assert expected in log, f"the daemon's log does not say {expected!r}:\n{log}"
    _assert_private(tor, log_mark, *secrets)
    return log


@pytest.mark.parametrize("case", ["closed_port", "exit_policy_reject", "unreachable_host"])
def test_exit_refusal_is_named_in_the_log(tor: Tor, case: str) -> None:
    """Tor reports these three as a general failure (0x01): its exit ends the stream with
    reason MISC (closed port, unreachable host) and its client gives up with CANT_ATTACH when
    no exit's policy allows the port. The daemon names what Tor said, and no destination."""
    host, port = {"closed_port": (WEB4, CLOSED_PORT),
                  "exit_policy_reject": (WEB4, POLICY_REJECTED_PORT),
                  "unreachable_host": (UNREACHABLE_HOST, ONION_WEB_PORT)}[case]
    mark, log_mark = tor.watch.mark(), tor.daemon.mark()
    got = _curl(tor, host, port, timeout=40)
    _refused(tor, got, log_mark, "refused CONNECT: general SOCKS server failure (0x01)",
             (host, f":{port}"))
    failed = _streams_to(tor.watch.with_status(mark, "FAILED", 1), port)
    print(f"\n[tor] {case}: Tor's stream FAILED reason {[e.reason for e in failed]}")
    assert failed, f"Tor reported no failed stream to port {port}"


def test_missing_onion_is_refused_with_its_extended_error(tor: Tor, product_rules: str) -> None:
    """A well-formed onion address nobody serves, through the daemon's own rules: Tor answers
    0xF0 (ExtendedErrors), the daemon says "onion service descriptor not found", and names
    neither the onion nor its virtual address."""
    log_mark = tor.daemon.mark()
    got = clients.wget(tor.world.client, f"http://{MISSING_ONION}/", timeout=60)
    _refused(tor, got, log_mark, "onion service descriptor not found (Tor) (0xf0)", (MISSING_ONION,))


# ---- load ---------------------------------------------------------------------------------------------

def test_bulk_data_through_tor_is_intact(tor: Tor) -> None:
    """4 MB of random bytes through daemon, Tor client, three relays: the sha256 matches."""
    data = os.urandom(BULK_BYTES)
    path = tor.world.web.www / "tor-bulk.bin"
    path.write_bytes(data)
    path.chmod(0o644)
    out = tor.world.lab.tmp / "tor-bulk.out"
    started = time.monotonic()
    got = clients.curl(tor.world.client, clients.url(WEB4, ISO_PORTS["none"], "/tor-bulk.bin"),
                       out=str(out), timeout=60)
    seconds = time.monotonic() - started
    assert got.ok, f"bulk fetch failed: {got.stderr}\n{tor.daemon.log()[-2000:]}"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    print(f"\n[tor] {BULK_BYTES >> 20} MB through Tor in {seconds:.1f}s")


def test_many_parallel_connections_each_get_a_circuit(tor: Tor) -> None:
    """PARALLEL concurrent fetches under isolation = connection all succeed, each on a
    circuit of its own (Tor builds them at once; bounded at 60 s)."""
    port = ISO_PORTS["connection"]
    mark = tor.watch.mark()
    started = time.monotonic()
    argv = tor.world.client.argv(["curl", "-q", "-sS", "--fail", "--max-time", "60", "-o", "/dev/null",
                                  clients.url(WEB4, port)])
    procs = [subprocess.Popen(argv, env=clean_env(), stderr=subprocess.PIPE) for _ in range(PARALLEL)]
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, 75 - (time.monotonic() - started))))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    seconds = time.monotonic() - started
    failures = [p.stderr.read().decode(errors="replace") for p, c in zip(procs, codes) if c != 0 and p.stderr]
    for proc in procs:
        if proc.stderr:
            proc.stderr.close()
    assert not failures, f"{len(failures)} of {PARALLEL} failed: {failures[:3]}"
    events = _succeeded(tor, mark, port, PARALLEL)
    circuits = collections.Counter(e.circuit for e in events)
    print(f"\n[tor] {PARALLEL} parallel fetches in {seconds:.1f}s on {len(circuits)} circuits; "
          f"{tor.watch.built_since(mark)} circuits built meanwhile")
    assert len(circuits) == PARALLEL, f"circuits shared: {circuits}"


# ---- Tor restarted under the daemon ------------------------------------------------------------

def test_tor_restarted_while_the_daemon_runs_service_resumes(tor: Tor) -> None:
    """While the Tor client is down the daemon refuses (and says the upstream is
    unreachable); once Tor is back, the same daemon relays again without a restart."""
    pid = tor.daemon.process.pid if tor.daemon.process else None
    tor.network.stop_client()
    log_mark = tor.daemon.mark()
    down = _curl(tor, WEB4, ISO_PORTS["connection"], timeout=10)
    assert not down.ok, "a fetch succeeded with the Tor client stopped"
    log = tor.daemon.wait_log("refused", since=log_mark)
    assert "refused" in log, f"no refusal logged with Tor down:\n{log}"
    tor.network.restart_client(timeout=60)
    tor.rewatch()
    deadline = time.monotonic() + 60
    while True:
        got = _curl(tor, WEB4, ISO_PORTS["connection"], timeout=20)
        if got.ok or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert got.ok, f"no service after Tor's restart: {got.stderr}\n{tor.daemon.log_since(log_mark)}"
    assert tor.daemon.alive() and tor.daemon.process and tor.daemon.process.pid == pid
    print(f"\n[tor] with Tor down the daemon said: {log.strip().splitlines()[-1] if log.strip() else ''}")
