"""Spell a plan for iptables-restore --noflush (IPv4) and ip6tables-restore --noflush (IPv6).

One family per ruleset, because each restore tool takes one: the back-end
"iptables" is the IPv4 half and "ip6tables" the IPv6 half. Load both.

Why the text looks as it does:

1. Our rules live in chains of our own (``METAPROXY``, and
   ``METAPROXY_TPROXY`` in mangle PREROUTING). With --noflush, declaring a
   chain that exists empties it, so the chains never accumulate rules.
2. The jump from the built-in chain is inserted first (``-I ... 1``): in
   filter OUTPUT an earlier ACCEPT of someone else's would otherwise let
   packets past the strict rules. Our chains end in RETURN, so the rules
   after ours still apply to what we let through.
3. A restore file cannot test whether the jump is already there, so loading
   twice adds a second jump (harmless: the chain gives the same verdict
   twice). The removal undoes exactly one load, atomically: if anything of
   it is missing, the restore fails and changes nothing.
4. The strict filter table is loaded first and removed last, so that a
   half-applied change (iptables-legacy commits table by table) never lets
   traffic out directly.
"""

from __future__ import annotations

from metaproxy.firewall import text
from metaproxy.firewall.rules import (
    Action, Chain, Dnat, Drop, Hook, Ndp, Plan, Redirect, Reject, RejectWith, Return, Rule, SetMark, Tproxy,
    endpoint,
)

CHAIN = "METAPROXY"

# hook -> (table, built-in chain, our chain)
_PLACES = {
    Hook.FILTER_OUTPUT: ("filter", "OUTPUT", CHAIN),
    Hook.MANGLE_OUTPUT: ("mangle", "OUTPUT", CHAIN),
    Hook.MANGLE_PREROUTING: ("mangle", "PREROUTING", f"{CHAIN}_TPROXY"),
    Hook.MANGLE_POSTROUTING: ("mangle", "POSTROUTING", f"{CHAIN}_GUARD"),
    Hook.NAT_OUTPUT: ("nat", "OUTPUT", CHAIN),
    Hook.NAT_PREROUTING: ("nat", "PREROUTING", f"{CHAIN}_LAN"),
    Hook.FILTER_FORWARD: ("filter", "FORWARD", f"{CHAIN}_FORWARD"),
    Hook.FILTER_INPUT: ("filter", "INPUT", f"{CHAIN}_INPUT"),
}
_LOAD_ORDER = ("filter", "mangle", "nat")

_NDP_NAMES = {
    Ndp.ROUTER_SOLICIT: "router-solicitation",
    Ndp.NEIGHBOR_SOLICIT: "neighbour-solicitation",
    Ndp.NEIGHBOR_ADVERT: "neighbour-advertisement",
}
_REJECT = {
    4: {RejectWith.TCP_RESET: "tcp-reset", RejectWith.PORT_UNREACHABLE: "icmp-port-unreachable",
        RejectWith.ADMIN_PROHIBITED: "icmp-admin-prohibited"},
    6: {RejectWith.TCP_RESET: "tcp-reset", RejectWith.PORT_UNREACHABLE: "icmp6-port-unreachable",
        RejectWith.ADMIN_PROHIBITED: "icmp6-adm-prohibited"},
}


def backend_name(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def render(plan: Plan, family: int) -> str:
    """The ruleset of one family, for ``iptables-restore --noflush`` / ``ip6tables-restore --noflush``."""
    out = [_header(plan, family)]
    for table in _LOAD_ORDER:
        chains = _chains(plan, family, table)
        if not chains:
            continue
        out.append(f"*{table}\n")
        out += [f":{_PLACES[c.hook][2]} - [0:0]\n" for c in chains]
        out += [f"-I {_PLACES[c.hook][1]} 1 -j {_PLACES[c.hook][2]}\n" for c in chains]
        for c in chains:
            out.append(_chain_rules(c, family))
        out.append("COMMIT\n")
    return "".join(out)


def render_unload(plan: Plan, family: int) -> str:
    """The exact inverse of one ``render(plan, family)`` load, for the same restore tool."""
    tool = f"{backend_name(family)}-restore --noflush"
    lines = [
        f"Removes the rules that \"{text.print_rules(backend_name(family), plan)}\" loaded.",
        f"Usage: {text.print_rules(backend_name(family), plan, unload=True)} | {tool}",
        "It fails, changing nothing, if those rules are not loaded exactly once.",
    ]
    routing = text.policy_routing(plan, (family,), undo_only=True)
    if routing:
        lines += ["", *routing]
    out = [text.comment_block(lines)]
    for table in reversed(_LOAD_ORDER):
        chains = _chains(plan, family, table)
        if not chains:
            continue
        out.append(f"*{table}\n")
        out += [f"-D {_PLACES[c.hook][1]} -j {_PLACES[c.hook][2]}\n" for c in chains]
        out += [f"-F {_PLACES[c.hook][2]}\n" for c in chains]
        out += [f"-X {_PLACES[c.hook][2]}\n" for c in chains]
        out.append("COMMIT\n")
    return "".join(out)


def _header(plan: Plan, family: int) -> str:
    name = backend_name(family)
    other = backend_name(6 if family == 4 else 4)
    tool = f"{name}-restore --noflush"
    lines = [
        *text.summary(plan, f"the IPv{family} half, for {tool}"),
        f"Load the IPv{6 if family == 4 else 4} half too: --print-rules {other}, into {other}-restore.",
        "",
        "Load once:",
        f"  {text.print_rules(name, plan)} | {tool}",
        "Remove (the same options, plus --unload):",
        f"  {text.print_rules(name, plan, unload=True)} | {tool}",
        "Loading again without removing first adds a second, harmless, jump to each chain.",
    ]
    routing = text.policy_routing(plan, (family,))
    if routing:
        lines += ["", *routing]
    if plan.notes:
        lines += ["", *text.notes(plan)]
    return text.comment_block(lines)


def _chains(plan: Plan, family: int, table: str) -> list[Chain]:
    return [c for c in plan.chains if _PLACES[c.hook][0] == table and c.for_family(family)]


def _chain_rules(chain: Chain, family: int) -> str:
    name = _PLACES[chain.hook][2]
    out, last_why = [], None
    for rule in chain.for_family(family):
        if rule.why != last_why:
            out.append(f"# {rule.why}\n")
            last_why = rule.why
        out += [f"-A {name} {' '.join(words)}\n" for words in _rule(rule, family)]
    return "".join(out)


def _rule(rule: Rule, family: int) -> list[list[str]]:
    """One rule of the plan, as one or more iptables rules (one per address or ICMPv6 type)."""
    m = rule.match
    head: list[str] = []
    if m.in_loopback:
        head += ["-i", "lo"]
    if m.out_loopback:
        head += ["-o", "lo"]
    if m.out_not_loopback:
        head += ["!", "-o", "lo"]
    if m.in_interface is not None:
        head += ["-i", _interface(m.in_interface)]
    if m.out_interface is not None:
        head += ["-o", _interface(m.out_interface)]
    if m.saddr is not None:
        head += ["-s", str(m.saddr)]
    tail: list[str] = []
    if m.proto is not None:
        tail += ["-p", m.proto.value if m.proto.value != "icmpv6" else "ipv6-icmp"]
        if m.sport is not None or m.dport is not None:
            tail += ["-m", m.proto.value]
        if m.sport is not None:
            tail += ["--sport", str(m.sport)]
        if m.dport is not None:
            tail += ["--dport", str(m.dport)]
    if m.daddr_local:
        tail += ["-m", "addrtype", "--dst-type", "LOCAL"]
    if m.uid is not None:
        tail += ["-m", "owner", "--uid-owner", m.uid]
    if m.mark is not None:
        tail += ["-m", "mark", "--mark", f"{m.mark:#x}"]
    target = _target(rule.action, family)
    dests = [["-d", str(net)] for net in m.daddr] or [[]]
    if m.ndp:
        return [head + d + ["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", _NDP_NAMES[t],
                            "-m", "hl", "--hl-eq", "255"] + tail + target for d in dests for t in m.ndp]
    return [head + d + tail + target for d in dests]


def _interface(name: str) -> str:
    """iptables spells a prefix with '+' where the config (and nftables) write '*'."""
    return name[:-1] + "+" if name.endswith("*") else name


def _target(action: Action, family: int) -> list[str]:
    if isinstance(action, Return):
        return ["-j", "RETURN"]
    if isinstance(action, Redirect):
        return ["-j", "REDIRECT", "--to-ports", str(action.port)]
    if isinstance(action, Dnat):
        return ["-j", "DNAT", "--to-destination", endpoint(action.address, action.port)]
    if isinstance(action, Reject):
        return ["-j", "REJECT", "--reject-with", _REJECT[family][action.reply]]
    if isinstance(action, Drop):
        return ["-j", "DROP"]
    if isinstance(action, SetMark):
        return ["-j", "MARK", "--set-mark", f"{action.mark:#x}"]
    if isinstance(action, Tproxy):
        return ["-j", "TPROXY", "--on-ip", str(action.address), "--on-port", str(action.port),
                "--tproxy-mark", f"{action.mark:#x}/0xffffffff"]
    raise TypeError(f"iptables: no spelling for the action {action!r}")
