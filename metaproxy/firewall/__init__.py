"""Firewall rulesets generated from the configuration, as text (``--print-rules``).

    render(config, backend, *, strict, unload=False) -> str

Back-ends (``BACKENDS``):

    iptables   the IPv4 half, for ``iptables-restore --noflush``
    ip6tables  the IPv6 half, for ``ip6tables-restore --noflush``
    nftables   both families in ``table inet metaproxy``, for ``nft -f -``

Layers, each importing only those below it:

    __init__ (config -> plain values, registry)
      plan (the builder: every decision)
      iptables, nftables (spelling)
        text (shared comments)
          rules (the vocabulary: matches, actions, chains, the Plan)

Everything here is pure text generation: no I/O, no subprocess, no socket.
The daemon never runs a firewall tool; tests/unit/test_architecture.py
keeps it that way.
"""

from __future__ import annotations

from typing import Callable

from metaproxy.config.model import Config, InetAddress, RedirectMode, UnixAddress, UpstreamType
from metaproxy.errors import ConfigError
from metaproxy.firewall import iptables, nftables
from metaproxy.firewall.plan import build
from metaproxy.firewall.rules import Mode, Plan, PlanError, Settings

__all__ = ["BACKENDS", "render", "settings_from", "plan_for", "tor_virtual_summary"]

_Renderer = Callable[[Plan], str]

# name -> (load, unload)
_REGISTRY: dict[str, tuple[_Renderer, _Renderer]] = {
    "iptables": (lambda p: iptables.render(p, 4), lambda p: iptables.render_unload(p, 4)),
    "ip6tables": (lambda p: iptables.render(p, 6), lambda p: iptables.render_unload(p, 6)),
    "nftables": (nftables.render, nftables.render_unload),
}
BACKENDS: tuple[str, ...] = tuple(_REGISTRY)


def render(config: Config, backend: str, *, strict: bool, unload: bool = False) -> str:
    """The ruleset (or, with ``unload``, its removal) for ``backend``.

    Raises ValueError for an unknown back-end, ConfigError for a value that
    cannot be put into a rule.
    """
    try:
        load, remove = _REGISTRY[backend]
    except KeyError:
        raise ValueError(f"unknown firewall back-end {backend!r}: expected one of {', '.join(BACKENDS)}") from None
    plan = plan_for(config, strict=strict)
    return remove(plan) if unload else load(plan)


def plan_for(config: Config, *, strict: bool) -> Plan:
    try:
        return build(settings_from(config, strict=strict))
    except PlanError as e:
        where = e.key if e.key.startswith("[") else "[firewall] exempt_users"
        raise ConfigError([f"{config.source}: {where}: expected {e.expected}, found {e.found}"]) from e


def tor_virtual_summary(config: Config) -> list[str]:
    """What ``--print-rules`` does with Tor's virtual addresses, as ``-t`` prints it."""
    nets = config.firewall.tor_virtual_networks
    if not nets:
        return ["tor: tor_virtual_networks is empty: Tor's virtual addresses are not diverted "
                "(.onion names from a DNSPort will not connect)"]
    socks5 = [u.name for u in config.upstreams.values() if u.type is UpstreamType.SOCKS5]
    lines = [f"tor: TCP to {', '.join(nets)} (Tor's virtual addresses) is diverted to port {config.daemon.port} "
             "before any network is exempted, and goes to the upstream its port routes to"]
    if any(":" in n for n in nets):
        lines.append("tor: that includes TCP to link-local IPv6 neighbours (fe80::/10); other link-local "
                     "traffic (neighbour discovery, DHCPv6) is not touched")
    lines.append("tor: pair it with torrc: DNSPort, AutomapHostsOnResolve 1, VirtualAddrNetworkIPv4/IPv6 "
                 "the same ranges" + ("" if socks5 else "; NOTE: no upstream is socks5, and only a Tor "
                                      "SocksPort can connect to its virtual addresses"))
    return lines


def settings_from(config: Config, *, strict: bool) -> Settings:
    """The plain values of the config that the rules depend on."""
    proxies, local = [], []
    for name, upstream in config.upstreams.items():
        address = upstream.address
        if isinstance(address, InetAddress):
            proxies.append((address.host, address.port))
            if address.ip.is_loopback:
                local.append(name)
        elif isinstance(address, UnixAddress):
            local.append(name)
    dns = config.firewall.dns
    return Settings(
        port=config.daemon.port,
        mode=Mode.TPROXY if config.daemon.mode is RedirectMode.TPROXY else Mode.REDIRECT,
        strict=strict,
        service_user=config.daemon.user,
        listen=tuple(config.daemon.listen),
        proxies=tuple(dict.fromkeys(proxies)),  # the same proxy twice needs one rule
        local_proxies=tuple(local),
        dns=None if dns is None else (dns.host, dns.port),
        exempt_users=tuple(dict.fromkeys(config.firewall.exempt_users)),
        lan_interfaces=config.firewall.lan_interfaces,
        tor_virtual=config.firewall.tor_virtual_networks,
    )
