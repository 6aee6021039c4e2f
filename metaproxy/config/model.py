"""The typed, frozen form of the configuration.

Nothing outside ``metaproxy.config`` sees ConfigObj: the rest of the daemon
works with these values only.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field, fields
from typing import Any

from metaproxy.config.lines import LineIndex


class UpstreamType(enum.Enum):
    SOCKS5 = "socks5"
    SOCKS4 = "socks4"
    SOCKS4A = "socks4a"
    HTTP = "http"


class Isolation(enum.Enum):
    """Which connections share Tor circuits (through SOCKS credentials)."""

    CONNECTION = "connection"
    DESTINATION = "destination"
    USER = "user"
    CLIENT = "client"  # the client's address: one unit per LAN client, like Tor's IsolateClientAddr
    NONE = "none"


@dataclass(frozen=True, slots=True)
class IsolationRule:
    """The units that key an upstream's SOCKS credentials, and how often they rotate.

    ``{USER, DESTINATION}``: one set of credentials (so one Tor circuit) per
    local user and destination. ``period`` seconds later every key changes,
    like Tor's MaxCircuitDirtiness; 0 never rotates. CONNECTION and NONE stand
    alone (the loader refuses them combined).
    """

    units: frozenset[Isolation]
    period: int = 0

    def has(self, unit: Isolation) -> bool:
        return unit in self.units

    def __str__(self) -> str:
        return ", ".join(u.value for u in Isolation if u in self.units)


# The shipped default (measured on a private Tor network): 100 connections
# to 5 sites from 2 users build 112 circuits per connection, 5 per destination, 2-3
# per user; per user and destination keeps users and sites apart with about 10.
DEFAULT_ISOLATION = IsolationRule(frozenset({Isolation.USER, Isolation.DESTINATION}), 600)
# The original program: fresh credentials for every connection (the legacy JSON format).
PER_CONNECTION = IsolationRule(frozenset({Isolation.CONNECTION}))

# connect_timeout when neither the upstream nor [daemon] sets it. Tor holds a SOCKS
# request up to SocksTimeout (120 s), retrying on new circuits after 10-15 s; an
# unreachable host took 9.2 s through three exits on the private network.
SOCKS5_CONNECT_TIMEOUT = 120.0
OTHER_CONNECT_TIMEOUT = 10.0


def default_connect_timeout(kind: "UpstreamType") -> float:
    return SOCKS5_CONNECT_TIMEOUT if kind is UpstreamType.SOCKS5 else OTHER_CONNECT_TIMEOUT


class RedirectMode(enum.Enum):
    REDIRECT = "redirect"
    TPROXY = "tproxy"


class SeccompAction(enum.Enum):
    KILL = "kill"
    LOG = "log"
    TRAP = "trap"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class InetAddress:
    host: str  # an IP literal, never a name
    port: int

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.host)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


UpstreamAddress = InetAddress | UnixAddress


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    type: UpstreamType
    address: UpstreamAddress
    username: str = ""
    password: str = field(default="", repr=False)
    connect_timeout: float = OTHER_CONNECT_TIMEOUT
    isolation: IsolationRule = DEFAULT_ISOLATION

    def describe(self) -> str:
        """One line for the relay table; the password is never shown."""
        auth = f" user={self.username}" if self.username else ""
        iso = ""
        if self.type is UpstreamType.SOCKS5 and not self.username:
            every = f" every {self.isolation.period}s" if self.isolation.period else ""
            iso = f" isolation={str(self.isolation).replace(' ', '')}{every}"
        return f"{self.name} ({self.type.value} {self.address}{auth}{iso} timeout={self.connect_timeout:g}s)"


@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int
    upstream: str

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Destination port to upstream name.

    A single port wins over a range, and a range over the ``*`` fallback.
    Ranges are kept as ranges so that ``1-65535`` costs one entry, not 65535.
    """

    ports: dict[int, str] = field(default_factory=dict)
    ranges: tuple[PortRange, ...] = ()
    fallback: str | None = None

    def lookup(self, port: int) -> str | None:
        name = self.ports.get(port)
        if name is not None:
            return name
        for r in self.ranges:
            if r.first <= port <= r.last:
                return r.upstream
        return self.fallback

    def names(self) -> set[str]:
        found = set(self.ports.values()) | {r.upstream for r in self.ranges}
        return found | ({self.fallback} if self.fallback else set())


def _reloadable(default: Any) -> Any:
    return field(default=default, metadata={"reload": True})


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """Each key says whether a reload (SIGHUP) may change it: ``_reloadable(default)``.

    The others were used before serving began: the listeners (listen, port,
    mode) were bound as root, the user and the sandbox (seccomp) set, and the
    debug warning about destinations logged. They take a restart.
    """

    listen: tuple[str, ...] = ("127.0.0.1", "::1")
    port: int = 8675
    mode: RedirectMode = RedirectMode.REDIRECT
    user: str = "_metaproxy"
    groups: tuple[str, ...] = ()  # supplementary groups kept through the drop (debian-tor)
    max_connections: int = _reloadable(4096)
    idle_timeout: float = _reloadable(900.0)
    # None: each upstream's type decides (default_connect_timeout); set, it applies
    # to every upstream that does not set its own.
    connect_timeout: float | None = _reloadable(None)
    drain_timeout: float = _reloadable(10.0)
    log_destinations: bool = False
    # Per-connection open/close lines (scrubbed unless log_destinations). Off by
    # default: when connections happen and how many bytes they move are
    # traffic-analysis material, and the journal keeps them on disk.
    log_connections: bool = _reloadable(False)
    log_refusals: int = _reloadable(10)  # refusal lines per minute; the rest are counted in one line
    seccomp: SeccompAction = SeccompAction.KILL

    @classmethod
    def reloadable(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata.get("reload"))

    @classmethod
    def restart_only(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if not f.metadata.get("reload"))


@dataclass(frozen=True, slots=True)
class FirewallSettings:
    dns: InetAddress | None = None
    # Users whose traffic the rules neither divert nor reject: a local Tor
    # (debian-tor) must reach its guards directly, or it would loop into us.
    exempt_users: tuple[str, ...] = ()
    # Gateway mode: the interfaces whose clients' connections are diverted in
    # PREROUTING (a name, or a prefix ending in '*'). Empty: this host only.
    lan_interfaces: tuple[str, ...] = ()
    # Tor's VirtualAddrNetworkIPv4/IPv6 (its defaults): the addresses its DNSPort
    # hands out for .onion and automapped names. TCP to them is diverted before
    # local networks are exempted. Empty: not diverted.
    tor_virtual_networks: tuple[str, ...] = ("10.192.0.0/10", "fe80::/10")


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    daemon: DaemonSettings
    upstreams: dict[str, Upstream]
    routes: RouteTable
    firewall: FirewallSettings = FirewallSettings()
    legacy: bool = False
    lines: LineIndex | None = field(default=None, compare=False, repr=False)  # None for legacy JSON

    def where(self, sections: tuple[str, ...], key: str | None = None) -> str:
        """'file:line' of a key (or its section) for messages; 'file' where lines are unknown."""
        line = self.lines.line(sections, key) if self.lines is not None else None
        return f"{self.source}:{line}" if line else self.source

    def upstream_for(self, port: int) -> Upstream | None:
        name = self.routes.lookup(port)
        return None if name is None else self.upstreams[name]

    def warnings(self) -> list[str]:
        """What is valid but almost certainly not meant; ``-t`` prints these."""
        if not self.routes.names():
            return [f"{self.source}: warning: [routes] is empty: every connection will be refused"]
        return []

    def gateway_summary(self) -> list[str]:
        """What gateway mode will do, as ``-t`` prints it; empty without lan_interfaces."""
        lan = self.firewall.lan_interfaces
        if not lan:
            return []
        dns = f"sent to {self.firewall.dns}" if self.firewall.dns else "rejected (no [firewall] dns)"
        client = [u.name for u in self.upstreams.values() if u.type is UpstreamType.SOCKS5
                  and not u.username and u.isolation.has(Isolation.CLIENT)
                  and not u.isolation.has(Isolation.USER)]
        user = [u.name for u in self.upstreams.values() if u.type is UpstreamType.SOCKS5
                and not u.username and u.isolation.has(Isolation.USER)]
        lines = [f"gateway: TCP from clients on {', '.join(lan)} is diverted to port {self.daemon.port} "
                 f"({self.daemon.mode.value}, in PREROUTING); their DNS is {dns}"]
        if client:
            lines.append(f"gateway: one Tor circuit per client address through {', '.join(client)}")
        if user:
            lines.append(f"gateway: {', '.join(user)} isolate by local user; a LAN client has none, so each "
                         "of its connections gets fresh credentials")
        lines.append("gateway: the daemon never sets sysctls; --print-rules names any the rules need")
        return lines

    def relay_table(self) -> list[str]:
        """The effective table, one line per route, as ``-t`` prints it."""
        lines = [f"{port:>11} -> {self.upstreams[name].describe()}"
                 for port, name in sorted(self.routes.ports.items())]
        lines += [f"{str(r):>11} -> {self.upstreams[r.upstream].describe()}"
                  for r in self.routes.ranges]
        if self.routes.fallback is not None:
            lines.append(f"{'*':>11} -> {self.upstreams[self.routes.fallback].describe()}")
        else:
            lines.append(f"{'*':>11} -> refused (no fallback route)")
        return lines
