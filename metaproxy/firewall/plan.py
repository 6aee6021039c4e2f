"""The builder of a neutral firewall plan: which packets to leave alone, divert, redirect or reject.

``build`` turns plain values (ports, addresses, user names) into a ``Plan``
of rules that name no tool (their vocabulary is ``rules.py``).
``iptables.py`` and ``nftables.py`` only spell it; every decision about
order and scope is made here, once, so that the two back-ends cannot drift
apart.

Pure: no I/O, no sockets, no subprocesses. The daemon never runs a firewall tool.
The chains for clients behind this host (gateway mode) are ``gateway.py``'s.

Why the rules are ordered as they are (the ``divert`` chain is nat OUTPUT
under REDIRECT, mangle OUTPUT under TPROXY):

1. The service user's own traffic is left alone first: its connections to the
   upstreams must never be sent back to itself.
2. Exempted users (for example ``debian-tor``, when Tor runs on this machine)
   are left alone next, for the same reason: Tor's own connections to its
   guards would otherwise be diverted into the proxy and loop.
3. TCP to Tor's virtual addresses (``[firewall] tor_virtual_networks``) goes
   to the listener before anything else is exempted: Tor's defaults,
   10.192.0.0/10 and fe80::/10, lie inside the reserved networks, and a
   loopback range (Tails uses 127.192.0.0/10) inside loopback. Only TCP: the
   host's own link-local traffic (neighbour discovery is ICMPv6, DHCPv6 UDP)
   is not touched; TCP to a real link-local neighbour is diverted too, which
   is why the range can be emptied or narrowed.
4. Loopback is local by definition.
5. In strict mode DNS is taken before the reserved networks, so that a query
   to the LAN's resolver (192.168.1.1:53) goes to the configured resolver too,
   and tcp/53 is never handed to the proxy: it is sent to the resolver or
   rejected, as udp/53 is.
6. The upstreams themselves, then the reserved and local networks, are not
   diverted: the proxy could not reach them anyway.
7. Everything else that is TCP goes to the listener.

The strict filter then lets through only loopback, what we diverted (now
bound for a loopback address, or carrying our TPROXY mark), the exempted
users, the upstreams, the resolver and IPv6 neighbour discovery, and
rejects the rest with a reply, so that applications fail at once instead of
waiting for a timeout. Under TPROXY a POSTROUTING guard drops marked packets
that would leave through a real interface (the policy routing is missing).
"""

from __future__ import annotations

import ipaddress
import re

from metaproxy.firewall import gateway
from metaproxy.firewall.rules import (
    DNS_PORT, TPROXY_MARK, Action, Chain, Dnat, Drop, Hook, IPAddress, IPNetwork, Match, Mode, Ndp, Plan,
    VIRTUAL_WHY, PlanError, Proto, Redirect, Reject, RejectWith, Return, Rule, SetMark, Settings, Tproxy, endpoint,
    to_networks,
)

# Debian's NAME_REGEX for system users, a little wider (upper case, '.'), or
# a numeric uid. The name is pasted into rule text, so nothing else may pass.
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")



# ---- building ------------------------------------------------------------------------

def build(s: Settings) -> Plan:
    """The plan for these settings. Raises PlanError on a value unfit for a rule."""
    _check_user("[daemon] user", s.service_user)
    for user in s.exempt_users:
        _check_user("exempt user", user)
    gateway.check_interfaces(s)
    reserved = _networks(s.reserved)
    virtual = _networks(s.tor_virtual, "[firewall] tor_virtual_networks")
    # An upstream on loopback is covered by the loopback rules already.
    proxies = tuple((ip, port) for ip, port in ((ipaddress.ip_address(h), p) for h, p in s.proxies)
                    if not ip.is_loopback)
    dns = None if s.dns is None else (ipaddress.ip_address(s.dns[0]), s.dns[1])
    listeners = {4: _listener(s.listen, 4), 6: _listener(s.listen, 6)}

    chains = [Chain(Hook.NAT_OUTPUT if s.mode is Mode.REDIRECT else Hook.MANGLE_OUTPUT,
                    _divert(s, reserved, virtual, proxies, dns, listeners))]
    if s.mode is Mode.TPROXY:
        chains.append(Chain(Hook.MANGLE_PREROUTING,
                            _tproxy(s, listeners) + gateway.mangle_prerouting(s, reserved, virtual, listeners)))
        chains.append(Chain(Hook.MANGLE_POSTROUTING, (Rule(
            Match(mark=TPROXY_MARK, out_not_loopback=True), Drop(),
            "marked packets leave only through lo: without the policy routing they would go out "
            "directly, so they are dropped instead"),)))
        if s.strict and dns is not None:
            # Only the resolver's family needs this chain: the other has nothing to translate.
            chains.append(Chain(Hook.NAT_OUTPUT, _leave_alone(s, dns[0].version) + _dns(dns)))
    if s.strict:
        chains.append(Chain(Hook.FILTER_OUTPUT, _strict(s, proxies, dns, listeners)))
    if s.lan_interfaces:
        chains += [Chain(hook, rules) for hook, rules in (
            (Hook.NAT_PREROUTING, gateway.nat_prerouting(s, reserved, virtual, dns, listeners)),
            (Hook.FILTER_FORWARD, gateway.filter_forward(s, dns)),
            (Hook.FILTER_INPUT, gateway.filter_input(s, dns))) if rules]
    notes = _notes(s, listeners) + tuple(gateway.notes(s, dns, listeners))
    return Plan(settings=s, chains=tuple(chains), notes=notes)


def _leave_alone(s: Settings, family: int | None = None) -> tuple[Rule, ...]:
    return _users_alone(s, family) + (_loopback_alone(family),)


def _users_alone(s: Settings, family: int | None = None) -> tuple[Rule, ...]:
    rules = [Rule(Match(family=family, uid=s.service_user), Return(),
                  "the daemon's own connections (to the upstreams)")]
    rules += [Rule(Match(family=family, uid=u), Return(), "exempted users (e.g. a local Tor's own connections)")
              for u in s.exempt_users]
    return tuple(rules)


def _loopback_alone(family: int | None = None) -> Rule:
    return Rule(Match(family=family, out_loopback=True), Return(), "loopback")


def _dns(dns: tuple[IPAddress, int]) -> tuple[Rule, ...]:
    ip, port = dns
    family = ip.version
    target: Action = Redirect(port) if ip == _loopback(family) else Dnat(ip, port)
    why = f"DNS goes to the configured resolver {endpoint(ip, port)}"
    return tuple(Rule(Match(family=family, proto=p, dport=DNS_PORT), target, why)
                 for p in (Proto.UDP, Proto.TCP))


def _divert(s: Settings, reserved: tuple[IPNetwork, ...], virtual: tuple[IPNetwork, ...],
            proxies: tuple[tuple[IPAddress, int], ...], dns: tuple[IPAddress, int] | None,
            listeners: dict[int, IPAddress | None]) -> tuple[Rule, ...]:
    rules = list(_users_alone(s))
    rules += to_networks(_send_to_listener(s, listeners), virtual, VIRTUAL_WHY)
    rules.append(_loopback_alone())
    if s.strict:
        rules += _divert_dns(s, dns)
    rules += [Rule(Match(family=ip.version, daddr=(ipaddress.ip_network(ip),), proto=Proto.TCP, dport=port),
                   Return(), "the upstream proxies") for ip, port in proxies]
    for family in (4, 6):
        nets = tuple(n for n in reserved if n.version == family)
        if nets:
            rules.append(Rule(Match(family=family, daddr=nets), Return(), "reserved and local networks"))
    rules += _send_to_listener(s, listeners)
    return tuple(rules)


def _divert_dns(s: Settings, dns: tuple[IPAddress, int] | None) -> list[Rule]:
    """Strict mode: DNS never reaches the proxy; it goes to the resolver or is rejected."""
    if dns is None:
        return [Rule(Match(proto=Proto.TCP, dport=DNS_PORT), Return(),
                     "no resolver is configured: DNS over TCP is not proxied, the filter rejects it")]
    if s.mode is Mode.TPROXY:
        return [Rule(Match(proto=Proto.TCP, dport=DNS_PORT), Return(),
                     "DNS over TCP is not diverted: the nat chain sends it to the resolver")]
    other = 6 if dns[0].version == 4 else 4
    return list(_dns(dns)) + [Rule(Match(family=other, proto=Proto.TCP, dport=DNS_PORT), Return(),
                                   f"the resolver is IPv{dns[0].version}: IPv{other} DNS over TCP "
                                   "is not proxied, the filter rejects it")]


def _send_to_listener(s: Settings, listeners: dict[int, IPAddress | None]) -> list[Rule]:
    why = "every other TCP connection goes to the daemon"
    if s.mode is Mode.TPROXY:
        return [Rule(Match(proto=Proto.TCP), SetMark(TPROXY_MARK),
                     why + " (marked, policy routing sends it in through lo)")]
    targets: dict[int, Action] = {}
    for family in (4, 6):
        ip = listeners[family]
        # REDIRECT in OUTPUT rewrites to exactly 127.0.0.1 or ::1; any other
        # listening address needs DNAT. With no listener in a family REDIRECT
        # still applies: the connection is refused (fail closed), never sent out.
        targets[family] = Redirect(s.port) if ip is None or ip == _loopback(family) or ip.is_unspecified \
            else Dnat(ip, s.port)
    if targets[4] == targets[6]:
        return [Rule(Match(proto=Proto.TCP), targets[4], why)]
    return [Rule(Match(family=f, proto=Proto.TCP), targets[f], why) for f in (4, 6)]


def _tproxy(s: Settings, listeners: dict[int, IPAddress | None]) -> tuple[Rule, ...]:
    rules = []
    for family in (4, 6):
        ip = listeners[family]
        on = _loopback(family) if ip is None or ip.is_unspecified else ip
        rules.append(Rule(Match(family=family, in_loopback=True, proto=Proto.TCP, mark=TPROXY_MARK),
                          Tproxy(on, s.port, TPROXY_MARK), "marked TCP arriving back through lo: to the daemon"))
    return tuple(rules)


def _strict(s: Settings, proxies: tuple[tuple[IPAddress, int], ...], dns: tuple[IPAddress, int] | None,
            listeners: dict[int, IPAddress | None]) -> tuple[Rule, ...]:
    # Why not just "-o lo": the output interface a filter rule sees is the one
    # of the route taken before NAT or a mark changed it. A connection that
    # REDIRECT rewrote to 127.0.0.1, or that TPROXY's mark reroutes to lo,
    # still shows the original interface. So the diverted traffic is allowed
    # by what we did to it: its new destination, or its mark.
    rules = [Rule(Match(out_loopback=True), Return(), "loopback, and local resolvers")]
    why = "diverted connections and DNS: REDIRECT rewrote the destination to loopback"
    rules += [Rule(Match(family=4, daddr=(ipaddress.ip_network("127.0.0.0/8"),)), Return(), why),
              Rule(Match(family=6, daddr=(ipaddress.ip_network("::1/128"),)), Return(), why)]
    if s.mode is Mode.REDIRECT:
        for family in (4, 6):
            ip = listeners[family]
            if ip is not None and not ip.is_loopback and not ip.is_unspecified:
                rules.append(Rule(Match(family=family, daddr=(ipaddress.ip_network(ip),), proto=Proto.TCP,
                                        dport=s.port), Return(), "diverted connections: DNAT to the listener"))
    else:
        rules.append(Rule(Match(mark=TPROXY_MARK), Return(),
                          "diverted connections: marked, so policy routing delivers them through lo"))
    rules += [Rule(Match(uid=u), Return(), "exempted users") for u in s.exempt_users]
    rules += [Rule(Match(family=ip.version, daddr=(ipaddress.ip_network(ip),), proto=Proto.TCP, dport=port),
                   Return(), "the daemon reaching the upstream proxies") for ip, port in proxies]
    if dns is not None and not dns[0].is_loopback:
        ip, port = dns
        rules += [Rule(Match(family=ip.version, daddr=(ipaddress.ip_network(ip),), proto=p, dport=port),
                       Return(), "the configured resolver") for p in (Proto.UDP, Proto.TCP)]
    # Neighbour discovery only when something we let out needs IPv6: otherwise
    # even the kernel's own solicitations (which name this host's link-local,
    # MAC-derived address) stay in.
    needs_ipv6 = any(ip.version == 6 for ip, _ in proxies) or bool(s.exempt_users) or \
        (dns is not None and dns[0].version == 6 and not dns[0].is_loopback)
    if needs_ipv6:
        rules.append(Rule(Match(family=6, ndp=tuple(Ndp)), Return(),
                          "IPv6 neighbour discovery (on-link only: hop limit 255), to reach IPv6 "
                          "upstreams, the resolver or what exempted users reach"))
    rules += gateway.filter_output(s)
    rules += [
        Rule(Match(proto=Proto.TCP), Reject(RejectWith.TCP_RESET), "everything else is refused at once"),
        Rule(Match(proto=Proto.UDP), Reject(RejectWith.PORT_UNREACHABLE), "everything else is refused at once"),
        Rule(Match(), Reject(RejectWith.ADMIN_PROHIBITED), "everything else is refused at once"),
    ]
    return tuple(rules)


def _notes(s: Settings, listeners: dict[int, IPAddress | None]) -> tuple[str, ...]:
    notes = []
    if s.local_proxies and not s.exempt_users:
        notes.append(f"the upstream(s) {', '.join(s.local_proxies)} run on this machine: if such a proxy "
                     "makes its own outgoing connections (Tor does), exempt the user it runs as in "
                     "[firewall] exempt_users (e.g. debian-tor), or those connections are diverted back into it")
    for family in (4, 6):
        if listeners[family] is None:
            notes.append(f"the daemon listens on no IPv{family} address: IPv{family} TCP connections "
                         "are refused (they are diverted to a port nothing listens on)")
    if s.strict and s.dns is None:
        notes.append("no [firewall] dns resolver is configured: DNS on udp/53 and tcp/53 is rejected")
    return tuple(notes)


# ---- helpers -------------------------------------------------------------------------

def _check_user(key: str, name: str) -> None:
    if not _USER_RE.fullmatch(name):
        raise PlanError(key, "a user name (letters, digits, '_', '.', '-') or a numeric uid", repr(name))


def _networks(texts: tuple[str, ...], key: str = "reserved network") -> tuple[IPNetwork, ...]:
    nets = []
    for text in texts:
        try:
            nets.append(ipaddress.ip_network(text))
        except ValueError as e:
            raise PlanError(key, "an IP network such as 10.0.0.0/8", repr(text)) from e
    return tuple(nets)


def _listener(listen: tuple[str, ...], family: int) -> IPAddress | None:
    """The address the daemon listens on in this family, if any (the first)."""
    for text in listen:
        ip = ipaddress.ip_address(text)
        if ip.version == family:
            return ip
    return None


def _loopback(family: int) -> IPAddress:
    return ipaddress.ip_address("127.0.0.1" if family == 4 else "::1")
