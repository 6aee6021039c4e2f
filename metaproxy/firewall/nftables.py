"""Spell a plan for ``nft -f``: both families in one table of our own, ``inet metaproxy``.

Why the text looks as it does:

1. Loading is idempotent and atomic. ``table inet metaproxy`` creates the
   table if it is missing (and does nothing otherwise), so the ``delete
   table`` after it always succeeds; the new table follows in the same
   transaction. There is no moment without rules, and no ``destroy``
   statement is needed (nft 1.0.6, Debian 12, does not have it).
2. Removal is the same two lines without the new table: it succeeds whether
   or not the rules are loaded.
3. Our base chains sit at the priorities of iptables' nat (-100), mangle
   (-150) and filter (0) tables. An "accept" or "return" here ends only our
   chain: other tables still see the packet, and their drop still wins; our
   reject is final whatever they say.
4. An address (``ip daddr``, ``ip6 daddr``, ``icmpv6``) implies its family;
   any other rule limited to one family says so with ``meta nfproto``.
"""

from __future__ import annotations

from metaproxy.firewall import text
from metaproxy.firewall.rules import (
    Action, Dnat, Drop, Hook, IPNetwork, Match, Ndp, Plan, Redirect, Reject, RejectWith, Return, Rule, SetMark,
    Tproxy, endpoint,
)

FAMILY = "inet"
TABLE = "metaproxy"

# hook -> (chain name, declaration)
_CHAINS = {
    Hook.FILTER_OUTPUT: ("filter_output", "type filter hook output priority 0; policy accept;"),
    Hook.MANGLE_OUTPUT: ("mangle_output", "type route hook output priority -150; policy accept;"),
    Hook.MANGLE_PREROUTING: ("mangle_prerouting", "type filter hook prerouting priority -150; policy accept;"),
    Hook.MANGLE_POSTROUTING: ("mangle_postrouting", "type filter hook postrouting priority -150; policy accept;"),
    Hook.NAT_OUTPUT: ("nat_output", "type nat hook output priority -100; policy accept;"),
    Hook.FILTER_INPUT: ("filter_input", "type filter hook input priority 0; policy accept;"),
    Hook.FILTER_FORWARD: ("filter_forward", "type filter hook forward priority 0; policy accept;"),
    Hook.NAT_PREROUTING: ("nat_prerouting", "type nat hook prerouting priority -100; policy accept;"),
}
_ORDER = (Hook.FILTER_OUTPUT, Hook.FILTER_INPUT, Hook.FILTER_FORWARD, Hook.MANGLE_OUTPUT,
          Hook.MANGLE_PREROUTING, Hook.MANGLE_POSTROUTING, Hook.NAT_OUTPUT, Hook.NAT_PREROUTING)

_NDP_NAMES = {
    Ndp.ROUTER_SOLICIT: "nd-router-solicit",
    Ndp.NEIGHBOR_SOLICIT: "nd-neighbor-solicit",
    Ndp.NEIGHBOR_ADVERT: "nd-neighbor-advert",
}
_REJECT = {
    RejectWith.TCP_RESET: "reject with tcp reset",
    RejectWith.PORT_UNREACHABLE: "reject with icmpx type port-unreachable",
    RejectWith.ADMIN_PROHIBITED: "reject with icmpx type admin-prohibited",
}
_NFPROTO = {4: "ipv4", 6: "ipv6"}
_ADDR = {4: "ip", 6: "ip6"}

# Creating the table first makes the delete succeed even when it was not there.
_REPLACE = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


def render(plan: Plan) -> str:
    """The ruleset for ``nft -f``; loading it again replaces the previous one."""
    out = [_header(plan), _REPLACE, "\n", f"table {FAMILY} {TABLE} {{\n"]
    chains = sorted(plan.chains, key=lambda c: _ORDER.index(c.hook))
    for i, chain in enumerate(chains):
        name, declaration = _CHAINS[chain.hook]
        out += ["\n" if i else "", f"\tchain {name} {{\n", f"\t\t{declaration}\n"]
        last_why = None
        for rule in chain.rules:
            if rule.why != last_why:
                out.append(f"\t\t# {rule.why}\n")
                last_why = rule.why
            out.append(f"\t\t{_rule(rule)}\n")
        out.append("\t}\n")
    out.append("}\n")
    return "".join(out)


def render_unload(plan: Plan) -> str:
    """Removal for ``nft -f``: succeeds whether or not the table is loaded."""
    lines = [f"Removes table {FAMILY} {TABLE}, which \"{text.print_rules('nftables', plan)}\" loaded.",
             f"Usage: {text.print_rules('nftables', plan, unload=True)} | nft -f -",
             f"(the same as: nft delete table {FAMILY} {TABLE}, except that this succeeds when it is gone)"]
    routing = text.policy_routing(plan, (4, 6), undo_only=True)
    if routing:
        lines += ["", *routing]
    return text.comment_block(lines) + _REPLACE


def _header(plan: Plan) -> str:
    lines = [
        *text.summary(plan, f"IPv4 and IPv6, in table {FAMILY} {TABLE}, for nft -f"),
        "",
        "Load (loading again replaces the table atomically):",
        f"  {text.print_rules('nftables', plan)} | nft -f -",
        "Remove:",
        f"  nft delete table {FAMILY} {TABLE}",
    ]
    routing = text.policy_routing(plan, (4, 6))
    if routing:
        lines += ["", *routing]
    if plan.notes:
        lines += ["", *text.notes(plan)]
    return text.comment_block(lines)


def _rule(rule: Rule) -> str:
    return " ".join(_match(rule.match) + _statement(rule.action))


def _match(m: Match) -> list[str]:
    words: list[str] = []
    if m.family is not None and not m.daddr and not m.ndp and m.saddr is None:
        words.append(f"meta nfproto {_NFPROTO[m.family]}")
    if m.in_interface is not None:
        words.append(f"iifname {_quote(m.in_interface)}")
    if m.out_interface is not None:
        words.append(f"oifname {_quote(m.out_interface)}")
    if m.in_loopback:
        words.append('iifname "lo"')
    if m.out_loopback:
        words.append('oifname "lo"')
    if m.out_not_loopback:
        words.append('oifname != "lo"')
    if m.uid is not None:
        words.append(f"meta skuid {m.uid if m.uid.isdigit() else _quote(m.uid)}")
    if m.mark is not None:
        words.append(f"meta mark {m.mark:#x}")
    if m.daddr_local:
        words.append("fib daddr type local")
    if m.saddr is not None:
        words.append(f"{_ADDR[m.saddr.version]} saddr {_net(m.saddr)}")
    if m.daddr:
        family = m.daddr[0].version
        nets = [_net(n) for n in m.daddr]
        words.append(f"{_ADDR[family]} daddr {nets[0] if len(nets) == 1 else '{ ' + ', '.join(nets) + ' }'}")
    if m.ndp:
        names = ", ".join(_NDP_NAMES[t] for t in m.ndp)
        words.append(f"icmpv6 type {{ {names} }} ip6 hoplimit 255")
    if m.proto is not None:
        ports = ([f"sport {m.sport}"] if m.sport is not None else []) + \
            ([f"dport {m.dport}"] if m.dport is not None else [])
        words.append(f"{m.proto.value} {' '.join(ports)}" if ports else f"meta l4proto {m.proto.value}")
    return words


def _net(net: IPNetwork) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _statement(action: Action) -> list[str]:
    if isinstance(action, Return):
        return ["return"]
    if isinstance(action, Redirect):
        return [f"redirect to :{action.port}"]
    if isinstance(action, Dnat):
        return [f"dnat {_ADDR[action.address.version]} to {endpoint(action.address, action.port)}"]
    if isinstance(action, Reject):
        return ["counter", _REJECT[action.reply]]
    if isinstance(action, Drop):
        return ["counter", "drop"]
    if isinstance(action, SetMark):
        return [f"meta mark set {action.mark:#x}"]
    if isinstance(action, Tproxy):
        return [f"tproxy {_ADDR[action.address.version]} to {endpoint(action.address, action.port)}", "accept"]
    raise TypeError(f"nftables: no spelling for the action {action!r}")


def _quote(name: str) -> str:
    # plan.build admits only [A-Za-z0-9_.-] (and a final '$' in a user name, a
    # final '*' in an interface prefix, which nft reads as a wildcard): nothing to escape.
    return f'"{name}"'
