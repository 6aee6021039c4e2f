"""The rule vocabulary of a firewall plan: what a rule may match and what it may do.

A ``Plan`` is chains of ``Rule``s, each a ``Match`` and an action, hung on a
``Hook``. None of these names a tool: ``iptables.py`` and ``nftables.py``
spell them, and ``plan.py`` decides which ones a configuration needs.

Pure values only: no I/O, no sockets, no subprocesses.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# The original metaproxy's list (README, "reserved IPv4 networks"), plus
# 100.64.0.0/10 (RFC 6598 shared address space), and their IPv6 equivalents.
# RFC 5737 (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) and RFC 3849
# (2001:db8::/32) documentation networks are deliberately NOT here: they are
# never routed on the internet, so excluding them protects nothing, and the
# test lab uses them as "the internet" to prove that traffic is diverted.
DEFAULT_RESERVED: tuple[str, ...] = (
    "0.0.0.0/8",        # "this network" (RFC 1122)
    "10.0.0.0/8",       # private (RFC 1918)
    "100.64.0.0/10",    # shared address space, carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local (RFC 3927)
    "172.16.0.0/12",    # private (RFC 1918)
    "192.168.0.0/16",   # private (RFC 1918)
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, and the limited broadcast 255.255.255.255
    "::/128",           # unspecified
    "::1/128",          # loopback
    "fc00::/7",         # unique local (RFC 4193)
    "fe80::/10",        # link-local
    "ff00::/8",         # multicast
)

# TPROXY: the fwmark that routes diverted packets back in through lo, and the
# routing table holding the "local" route that makes them arrive.
TPROXY_MARK = 0x8675
TPROXY_TABLE = 8675

DNS_PORT = 53

# Tor's own defaults for VirtualAddrNetworkIPv4 and VirtualAddrNetworkIPv6: the
# addresses its DNSPort hands out (AutomapHostsOnResolve) for .onion names.
# Both overlap DEFAULT_RESERVED (10.0.0.0/8, fe80::/10), so the plan diverts
# them before it exempts the reserved networks.
TOR_VIRTUAL_DEFAULT: tuple[str, ...] = ("10.192.0.0/10", "fe80::/10")


class Mode(enum.Enum):
    REDIRECT = "redirect"
    TPROXY = "tproxy"


class Hook(enum.Enum):
    """Where a chain hangs. Each back-end maps these to its own names."""

    NAT_OUTPUT = "nat output"              # REDIRECT/DNAT of locally generated packets
    MANGLE_OUTPUT = "mangle output"        # TPROXY: mark, so that policy routing sends them to lo
    MANGLE_PREROUTING = "mangle prerouting"  # TPROXY: hand marked packets to the listener
    MANGLE_POSTROUTING = "mangle postrouting"  # TPROXY: marked packets must not leave (no policy routing)
    FILTER_OUTPUT = "filter output"        # strict: reject what is not allowed
    # Gateway mode ([firewall] lan_interfaces): clients behind this host.
    NAT_PREROUTING = "nat prerouting"      # REDIRECT/DNAT of what arrives on the LAN interfaces
    FILTER_FORWARD = "filter forward"      # LAN DNS that is not ours; strict: nothing else is routed
    FILTER_INPUT = "filter input"          # LAN DNS that is not ours; strict: only the daemon and DNS


class Proto(enum.Enum):
    TCP = "tcp"
    UDP = "udp"
    ICMPV6 = "icmpv6"


class RejectWith(enum.Enum):
    TCP_RESET = "tcp reset"
    PORT_UNREACHABLE = "port unreachable"   # UDP: the application sees ECONNREFUSED at once
    ADMIN_PROHIBITED = "admin prohibited"   # anything else: "communication administratively prohibited"


class Ndp(enum.Enum):
    """The ICMPv6 messages a host needs to reach an on-link IPv6 neighbour (RFC 4861)."""

    ROUTER_SOLICIT = 133
    NEIGHBOR_SOLICIT = 135
    NEIGHBOR_ADVERT = 136


@dataclass(frozen=True, slots=True)
class Match:
    """All fields must match. ``family`` None means both IPv4 and IPv6.

    ``in_interface`` and ``out_interface`` are names, or prefixes ending in
    '*' (which iptables spells '+').
    """

    family: int | None = None
    uid: str | None = None
    out_loopback: bool = False
    out_not_loopback: bool = False      # in POSTROUTING: the interface after any rerouting
    in_loopback: bool = False
    daddr: tuple[IPNetwork, ...] = ()   # any of these
    proto: Proto | None = None
    dport: int | None = None
    ndp: tuple[Ndp, ...] = ()           # any of these; implies ICMPv6 with hop limit 255
    mark: int | None = None
    in_interface: str | None = None
    out_interface: str | None = None
    daddr_local: bool = False           # to an address of this host (any interface)
    saddr: IPNetwork | None = None
    sport: int | None = None            # with proto


@dataclass(frozen=True, slots=True)
class Return:
    """Leave the packet alone: no NAT, no mark, no rejection from us."""


@dataclass(frozen=True, slots=True)
class Redirect:
    """To the primary loopback address (127.0.0.1 or ::1) at ``port``."""

    port: int


@dataclass(frozen=True, slots=True)
class Dnat:
    address: IPAddress
    port: int


@dataclass(frozen=True, slots=True)
class Reject:
    reply: RejectWith


@dataclass(frozen=True, slots=True)
class Drop:
    """Where REJECT is not allowed (POSTROUTING, as a safety net), or where no reply is owed
    (packets from outside bound for the LAN behind a gateway)."""


@dataclass(frozen=True, slots=True)
class SetMark:
    mark: int


@dataclass(frozen=True, slots=True)
class Tproxy:
    address: IPAddress
    port: int
    mark: int


Action = Union[Return, Redirect, Dnat, Reject, Drop, SetMark, Tproxy]


@dataclass(frozen=True, slots=True)
class Rule:
    match: Match
    action: Action
    why: str  # printed as a comment above each group of rules


@dataclass(frozen=True, slots=True)
class Chain:
    hook: Hook
    rules: tuple[Rule, ...]

    def for_family(self, family: int) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.match.family in (None, family))


@dataclass(frozen=True, slots=True)
class Settings:
    """The plain values a plan is built from (see ``metaproxy.firewall.settings_from``)."""

    port: int
    mode: Mode
    strict: bool
    service_user: str
    listen: tuple[str, ...] = ("127.0.0.1", "::1")
    proxies: tuple[tuple[str, int], ...] = ()    # (IP literal, TCP port) of each upstream
    local_proxies: tuple[str, ...] = ()          # upstream names on this machine (loopback or unix:)
    dns: tuple[str, int] | None = None           # strict mode's resolver
    exempt_users: tuple[str, ...] = ()
    reserved: tuple[str, ...] = DEFAULT_RESERVED
    lan_interfaces: tuple[str, ...] = ()         # gateway mode: clients behind these are diverted
    tor_virtual: tuple[str, ...] = ()            # Tor's virtual ranges: diverted before any exemption


@dataclass(frozen=True, slots=True)
class Plan:
    settings: Settings
    chains: tuple[Chain, ...]
    notes: tuple[str, ...] = field(default=())  # warnings, printed as comments

    @property
    def mode(self) -> Mode:
        return self.settings.mode

    @property
    def strict(self) -> bool:
        return self.settings.strict

    def chain(self, hook: Hook) -> Chain | None:
        return next((c for c in self.chains if c.hook is hook), None)



class PlanError(ValueError):
    """A value cannot be put into a rule (the caller names the config key)."""

    def __init__(self, key: str, expected: str, found: str) -> None:
        super().__init__(f"{key}: expected {expected}, found {found}")
        self.key, self.expected, self.found = key, expected, found


VIRTUAL_WHY = ("Tor's virtual addresses (.onion and names its DNSPort mapped): to the daemon, "
               "before any exemption")


def to_networks(rules: list[Rule] | tuple[Rule, ...], nets: tuple[IPNetwork, ...], why: str) -> list[Rule]:
    """``rules`` limited to destinations in ``nets``: each family's rules to that family's networks."""
    out = []
    for family in (4, 6):
        mine = tuple(n for n in nets if n.version == family)
        out += [Rule(dataclasses.replace(r.match, family=family, daddr=mine), r.action, why)
                for r in rules if mine and r.match.family in (None, family)]
    return out


def endpoint(ip: IPAddress, port: int) -> str:
    """``ip:port``, or ``[ip]:port`` for IPv6, as both back-ends write a NAT target."""
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
