"""Comment text shared by the back-ends: what a ruleset is, how to load and remove it.

Sits below ``iptables.py`` and ``nftables.py`` and imports only ``rules``.
"""

from __future__ import annotations

import textwrap

from metaproxy.firewall.rules import TPROXY_MARK, TPROXY_TABLE, Mode, Plan

PROGRAM = "subgraph_metaproxy"
WIDTH = 96


def print_rules(backend: str, plan: Plan, *, unload: bool = False) -> str:
    """The command line that prints this ruleset (or its removal)."""
    flags = " --strict" if plan.strict else ""
    return f"{PROGRAM} --print-rules {backend}{flags}{' --unload' if unload else ''}"


def summary(plan: Plan, what: str) -> list[str]:
    mode = plan.mode.value
    strict = ("strict (Tor enforcement: everything else that leaves this machine is rejected)"
              if plan.strict else "not strict (only TCP is diverted; other traffic is not touched)")
    lines = [f"Firewall rules for {PROGRAM}(8), generated from its configuration: {what}.",
             f"Mode {mode}, listener port {plan.settings.port}; {strict}."]
    virtual = plan.settings.tor_virtual
    if virtual:
        lines.append(f"Tor's virtual addresses ({', '.join(virtual)}: [firewall] tor_virtual_networks, for .onion "
                     "names from Tor's DNSPort): their TCP goes to the daemon before any network is exempted"
                     + (", including TCP to link-local neighbours." if any(":" in n for n in virtual) else "."))
    lan = plan.settings.lan_interfaces
    if lan:
        lines.append(f"Gateway: TCP from clients on {', '.join(lan)} is diverted to the daemon too, and their DNS "
                     "goes to [firewall] dns or is rejected"
                     + ("; nothing else from them is routed, and the gateway accepts from them only the daemon "
                        "and DNS." if plan.strict else "."))
    return lines


def notes(plan: Plan) -> list[str]:
    return [f"NOTE: {note}." for note in plan.notes]


def policy_routing(plan: Plan, families: tuple[int, ...], *, undo_only: bool = False) -> list[str]:
    """TPROXY only: the routing that brings marked packets back in through lo."""
    if plan.mode is not Mode.TPROXY:
        return []
    add, remove = [], []
    for family in families:
        any_net = "0.0.0.0/0" if family == 4 else "::/0"
        add += [f"  ip -{family} rule add fwmark {TPROXY_MARK:#x} lookup {TPROXY_TABLE}",
                f"  ip -{family} route add local {any_net} dev lo table {TPROXY_TABLE}"]
        remove += [f"  ip -{family} rule del fwmark {TPROXY_MARK:#x} lookup {TPROXY_TABLE}",
                   f"  ip -{family} route del local {any_net} dev lo table {TPROXY_TABLE}"]
    if undo_only:
        return ["TPROXY: undo the policy routing as well, as root:", *remove]
    return ["TPROXY also needs policy routing, which a ruleset cannot set up. As root, once:",
            *add, "and to undo it:", *remove]


def comment_block(lines: list[str]) -> str:
    """Each line as a comment; long prose is wrapped, commands (indented) never are."""
    out = []
    for line in lines:
        if not line:
            out.append("#\n")
            continue
        wrapped = [line] if line.startswith("  ") else textwrap.wrap(line, WIDTH, subsequent_indent="  ")
        out += [f"# {part}\n" for part in wrapped]
    return "".join(out)
