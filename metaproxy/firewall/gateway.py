"""Gateway mode: the rules for clients behind this host (``[firewall] lan_interfaces``).

Sandboxes in their own network namespaces, containers and VMs on a bridge,
or a LAN: their connections cross PREROUTING and FORWARD, never the OUTPUT
chains that catch this host's own programs. Why the rules are as they are:

1. Only what arrives on the named interfaces is touched. The uplink, and
   any other interface, keeps whatever rules the administrator has.
2. DNS is taken first, whatever its destination: a client whose resolv.conf
   names the gateway, or some resolver on the internet, is answered by
   ``[firewall] dns``. Without a resolver (or for the family it does not
   have) DNS is rejected, in FORWARD and INPUT, strict or not, and tcp/53 is
   never handed to the proxy.
3. TCP to Tor's virtual addresses (``tor_virtual_networks``) goes to the
   daemon first, before the exemptions below: Tor's default ranges lie
   inside the reserved networks.
4. Connections to the gateway itself (any of its addresses, whatever the
   interface: addrtype LOCAL, ``fib daddr type local``) and to the reserved
   networks are not diverted, so that a client reaching the daemon's port
   directly meets the daemon's loop guard, and the other services of the
   gateway meet the filter.
5. The rest of the TCP goes to the daemon. Under REDIRECT, PREROUTING
   rewrites the destination to the address of the interface the connection
   came in on, so the daemon listens there or on a wildcard; a listener on
   another address of that family is reached by DNAT. Under TPROXY the
   packet is handed to the listening socket and the policy routing brings
   it in through lo, as for local clients.
6. ``--strict`` makes the gateway fail closed: FORWARD rejects everything
   from those interfaces (with a reply, so that clients fail at once) except
   a resolver on another host, and drops everything to them that is not
   that resolver's answer. INPUT accepts from them only the daemon (its
   port under REDIRECT, our mark under TPROXY), the resolver and IPv6
   neighbour discovery. The local strict filter lets this host's packets
   out to the LAN: replies to its clients and neighbour discovery stay on
   our side of the uplink.

The daemon never sets a sysctl. Nothing diverted needs forwarding (it is
delivered locally); a resolver on another host does, and a resolver on
127.0.0.0/8 needs ``route_localnet`` on the LAN interfaces (the notes say
so). A resolver on ::1 cannot serve another host at all.
"""

from __future__ import annotations

import ipaddress

from metaproxy.firewall.rules import (
    DNS_PORT, TPROXY_MARK, Action, Dnat, Drop, IPAddress, IPNetwork, Match, Mode, Ndp, PlanError, Proto,
    VIRTUAL_WHY, Redirect, Reject, RejectWith, Return, Rule, Settings, Tproxy, endpoint, to_networks,
)

Resolver = tuple[IPAddress, int]


def check_interfaces(s: Settings) -> None:
    """The names are pasted into rules: only the characters the config admits."""
    for name in s.lan_interfaces:
        stem = name[:-1] if name.endswith("*") else name
        if not stem or len(stem) > 15 or not all(c.isascii() and (c.isalnum() or c in "_.-") for c in stem):
            raise PlanError("[firewall] lan_interfaces", "interface names, or prefixes ending in '*'", repr(name))


def nat_prerouting(s: Settings, reserved: tuple[IPNetwork, ...], virtual: tuple[IPNetwork, ...],
                   dns: Resolver | None, listeners: dict[int, IPAddress | None]) -> tuple[Rule, ...]:
    """DNS, then (under REDIRECT) Tor's virtual addresses and the rest of the TCP."""
    rules: list[Rule] = []
    for lan in s.lan_interfaces:
        rules += _dns(lan, dns)
        if s.mode is Mode.REDIRECT:
            rules += to_networks(_to_listener(s, lan, listeners), virtual, VIRTUAL_WHY)
            rules += _not_diverted(lan, reserved)
            rules += _to_listener(s, lan, listeners)
    return tuple(rules)


def mangle_prerouting(s: Settings, reserved: tuple[IPNetwork, ...], virtual: tuple[IPNetwork, ...],
                      listeners: dict[int, IPAddress | None]) -> tuple[Rule, ...]:
    """TPROXY: the LAN's TCP to the listening socket, marked for the policy routing."""
    rules: list[Rule] = []
    for lan in s.lan_interfaces:
        to_daemon = []
        for family in (4, 6):
            ip = listeners[family]
            on = ipaddress.ip_address("127.0.0.1" if family == 4 else "::1") if ip is None or ip.is_unspecified \
                else ip
            to_daemon.append(Rule(Match(family=family, in_interface=lan, proto=Proto.TCP),
                                  Tproxy(on, s.port, TPROXY_MARK), "every other TCP connection from the LAN goes "
                                  "to the daemon (marked, policy routing delivers it through lo)"))
        rules += to_networks(to_daemon, virtual, VIRTUAL_WHY)
        rules += _not_diverted(lan, reserved)
        rules.append(Rule(Match(in_interface=lan, proto=Proto.TCP, dport=DNS_PORT), Return(),
                          "LAN DNS over TCP is not proxied: the nat chain sends it to the resolver or the "
                          "filter rejects it"))
        rules += to_daemon
    return tuple(rules)


def filter_forward(s: Settings, dns: Resolver | None) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for lan in s.lan_interfaces:
        rules += _resolver_forwarded(lan, dns)
        rules += _reject_dns(lan, "LAN DNS that no rule sends to the resolver is rejected")
        if s.strict:
            rules += _reject_rest(lan, "nothing else from the LAN is routed: UDP (QUIC), ICMP, other "
                                  "protocols, IPv6, and TCP that was not diverted")
            rules.append(Rule(Match(out_interface=lan), Drop(),
                              "nothing is routed to the LAN that is not the resolver's answer"))
    return tuple(rules)


def filter_input(s: Settings, dns: Resolver | None) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for lan in s.lan_interfaces:
        if dns is not None and not (dns[0].version == 6 and dns[0].is_loopback):
            ip, port = dns
            rules += [Rule(Match(family=ip.version, in_interface=lan, daddr=(ipaddress.ip_network(ip),), proto=p,
                                 dport=port),
                           Return(), "LAN DNS sent to the configured resolver") for p in (Proto.UDP, Proto.TCP)]
        if s.strict:
            if s.mode is Mode.REDIRECT:
                rules.append(Rule(Match(in_interface=lan, proto=Proto.TCP, dport=s.port), Return(),
                                  "the daemon's port: diverted connections (and direct ones, which the "
                                  "daemon's loop guard refuses)"))
            else:
                rules.append(Rule(Match(in_interface=lan, mark=TPROXY_MARK), Return(),
                                  "diverted connections: marked, delivered to the daemon through lo"))
            rules.append(Rule(Match(family=6, in_interface=lan, ndp=tuple(Ndp)), Return(),
                              "IPv6 neighbour discovery with the LAN (on-link only: hop limit 255)"))
        rules += _reject_dns(lan, "DNS to the gateway that is not the configured resolver is rejected")
        if s.strict:
            rules += _reject_rest(lan, "nothing else on the gateway is open to the LAN")
    return tuple(rules)


def filter_output(s: Settings) -> tuple[Rule, ...]:
    """Strict: this host may send to the LAN (replies to its clients, neighbour discovery)."""
    return tuple(Rule(Match(out_interface=lan), Return(),
                      "to the LAN behind this gateway: replies to its clients, neighbour discovery")
                 for lan in s.lan_interfaces)


def notes(s: Settings, dns: Resolver | None, listeners: dict[int, IPAddress | None]) -> list[str]:
    if not s.lan_interfaces:
        return []
    names = ", ".join(s.lan_interfaces)
    found = []
    if s.mode is Mode.REDIRECT:
        for family in (4, 6):
            if lan_listener(listeners, s.listen, family) is None and not _wildcard(s.listen, family):
                found.append(f"the daemon listens on no IPv{family} address that LAN clients reach: their "
                             f"IPv{family} TCP connections are refused")
    if dns is None:
        found.append(f"no [firewall] dns resolver is configured: DNS from {names} is rejected")
    elif dns[0].version == 4 and dns[0].is_loopback:
        found.append(f"LAN DNS is sent to {endpoint(*dns)}, on loopback: set net.ipv4.conf.<interface>."
                     f"route_localnet=1 for each of {names} (the daemon never sets it), or give "
                     "[firewall] dns the gateway's address on the LAN")
    elif dns[0].is_loopback:
        found.append(f"a resolver on {dns[0]} cannot answer another host: DNS from {names} is rejected")
    return found


# ---- the pieces ------------------------------------------------------------------------

def _dns(lan: str, dns: Resolver | None) -> list[Rule]:
    if dns is None or (dns[0].version == 6 and dns[0].is_loopback):
        return [Rule(Match(in_interface=lan, proto=Proto.TCP, dport=DNS_PORT), Return(),
                     "no resolver for the LAN: DNS over TCP is not proxied, the filter rejects it")]
    ip, port = dns
    why = f"LAN DNS goes to the configured resolver {endpoint(ip, port)}"
    target: Action = Dnat(ip, port)
    rules = [Rule(Match(family=ip.version, in_interface=lan, proto=p, dport=DNS_PORT), target, why)
             for p in (Proto.UDP, Proto.TCP)]
    other = 6 if ip.version == 4 else 4
    rules.append(Rule(Match(family=other, in_interface=lan, proto=Proto.TCP, dport=DNS_PORT), Return(),
                      f"the resolver is IPv{ip.version}: IPv{other} DNS over TCP from the LAN is not proxied, "
                      "the filter rejects it"))
    return rules


def _not_diverted(lan: str, reserved: tuple[IPNetwork, ...]) -> list[Rule]:
    rules = [Rule(Match(in_interface=lan, daddr_local=True), Return(),
                  "to the gateway itself: not diverted (the daemon's loop guard, or the filter, decides)")]
    for family in (4, 6):
        nets = tuple(n for n in reserved if n.version == family)
        if nets:
            rules.append(Rule(Match(family=family, in_interface=lan, daddr=nets), Return(),
                              "reserved and local networks"))
    return rules


def _to_listener(s: Settings, lan: str, listeners: dict[int, IPAddress | None]) -> list[Rule]:
    why = "every other TCP connection from the LAN goes to the daemon"
    targets: dict[int, Action] = {}
    for family in (4, 6):
        ip = lan_listener(listeners, s.listen, family)
        # REDIRECT in PREROUTING rewrites to the receiving interface's own
        # address, which a wildcard listener accepts. A listener on one
        # address is reached by DNAT. With neither, REDIRECT still applies:
        # the connection is refused (fail closed), never routed.
        targets[family] = Dnat(ip, s.port) if ip is not None else Redirect(s.port)
    if targets[4] == targets[6]:
        return [Rule(Match(in_interface=lan, proto=Proto.TCP), targets[4], why)]
    return [Rule(Match(family=f, in_interface=lan, proto=Proto.TCP), targets[f], why) for f in (4, 6)]


def lan_listener(listeners: dict[int, IPAddress | None], listen: tuple[str, ...], family: int) -> IPAddress | None:
    """The first listening address of the family that LAN clients reach, unless a wildcard covers it."""
    if _wildcard(listen, family):
        return None
    for text in listen:
        ip = ipaddress.ip_address(text)
        if ip.version == family and not ip.is_loopback:
            return ip
    return None


def _wildcard(listen: tuple[str, ...], family: int) -> bool:
    return any(ipaddress.ip_address(t).version == family and ipaddress.ip_address(t).is_unspecified
               for t in listen)


def _resolver_forwarded(lan: str, dns: Resolver | None) -> list[Rule]:
    """A resolver on another host is reached through FORWARD: its queries and its answers."""
    if dns is None or dns[0].is_loopback:
        return []
    ip, port = dns
    net = ipaddress.ip_network(ip)
    rules = [Rule(Match(family=ip.version, in_interface=lan, daddr=(net,), proto=p, dport=port), Return(),
                  "LAN DNS sent to the configured resolver") for p in (Proto.UDP, Proto.TCP)]
    rules += [Rule(Match(family=ip.version, out_interface=lan, saddr=net, proto=p, sport=port), Return(),
                   "the configured resolver's answers") for p in (Proto.UDP, Proto.TCP)]
    return rules


def _reject_dns(lan: str, why: str) -> list[Rule]:
    return [Rule(Match(in_interface=lan, proto=Proto.UDP, dport=DNS_PORT), Reject(RejectWith.PORT_UNREACHABLE), why),
            Rule(Match(in_interface=lan, proto=Proto.TCP, dport=DNS_PORT), Reject(RejectWith.TCP_RESET), why)]


def _reject_rest(lan: str, why: str) -> list[Rule]:
    return [Rule(Match(in_interface=lan, proto=Proto.TCP), Reject(RejectWith.TCP_RESET), why),
            Rule(Match(in_interface=lan, proto=Proto.UDP), Reject(RejectWith.PORT_UNREACHABLE), why),
            Rule(Match(in_interface=lan), Reject(RejectWith.ADMIN_PROHIBITED), why)]
