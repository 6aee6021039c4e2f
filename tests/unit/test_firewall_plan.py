"""The builder (metaproxy.firewall.plan) and render(): what the generated rules divert, exempt
and reject, in which order, checked on the plan and on the text of each back-end."""

from __future__ import annotations

import dataclasses
import ipaddress
import pathlib
import re

import pytest

from metaproxy.config import load
from metaproxy.config.model import FirewallSettings
from metaproxy.errors import ConfigError
from metaproxy.firewall import BACKENDS, plan_for, render
from metaproxy.firewall.rules import (
    VIRTUAL_WHY, Dnat, Hook, Plan, Proto, Redirect, Reject, RejectWith, Return, SetMark, Tproxy,
)
from tests.unit.firewall_fixtures import config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def targets(plan: Plan, hook: Hook, family: int) -> list[object]:
    chain = plan.chain(hook)
    assert chain is not None, f"no {hook.value} chain"
    return [r.action for r in chain.for_family(family)]


# ---- what is diverted, and what is left alone -------------------------------------------


def test_nat_chain_order_service_user_first_redirect_last(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path), strict=False)
    chain = plan.chain(Hook.NAT_OUTPUT)
    assert chain is not None
    rules = chain.for_family(4)
    assert rules[0].match.uid == "nobody" and isinstance(rules[0].action, Return)
    assert rules[1].match.daddr == (ipaddress.ip_network("10.192.0.0/10"),) and rules[1].action == Redirect(8675)
    assert rules[2].match.out_loopback
    assert rules[-1].action == Redirect(8675) and rules[-1].match.proto is not None
    assert all(isinstance(r.action, Return) for r in rules[2:-1])


# ---- Tor's virtual addresses ([firewall] tor_virtual_networks) ----------------------------


VIRTUAL4, VIRTUAL6 = ipaddress.ip_network("10.192.0.0/10"), ipaddress.ip_network("fe80::/10")


def _first_match(rules: tuple[object, ...] | list[object], ip: str) -> object:
    """The first rule a TCP packet from an ordinary user to ``ip`` meets (uid and interface rules skipped)."""
    address = ipaddress.ip_address(ip)
    for rule in rules:
        m = rule.match  # type: ignore[attr-defined]
        if m.uid or m.out_loopback or m.in_loopback or m.dport or m.mark or m.daddr_local or m.ndp:
            continue
        if m.family not in (None, address.version) or (m.daddr and not any(address in n for n in m.daddr)):
            continue
        if m.proto not in (None, Proto.TCP):
            continue
        return rule
    raise AssertionError(f"no rule matches {ip}")


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("ip", ["10.192.0.1", "10.255.255.254", "fe80::1", "febf::1"])
def test_tcp_to_a_virtual_address_is_diverted_before_the_reserved_networks_are_exempted(
        tmp_path: pathlib.Path, mode: str, strict: bool, ip: str) -> None:
    """Tor's virtual addresses lie inside 10.0.0.0/8 and fe80::/10: the diversion comes first."""
    plan = plan_for(config(tmp_path, daemon=f"mode = {mode}", dns="192.0.2.53:53"), strict=strict)
    hook = Hook.NAT_OUTPUT if mode == "redirect" else Hook.MANGLE_OUTPUT
    chain = plan.chain(hook)
    assert chain is not None
    rule = _first_match(chain.for_family(ipaddress.ip_address(ip).version), ip)
    assert rule.action in (Redirect(8675), SetMark(0x8675)), rule  # type: ignore[attr-defined]
    assert rule.match.proto is Proto.TCP  # type: ignore[attr-defined]


@pytest.mark.parametrize("ip", ["10.0.0.1", "10.191.255.255", "fc00::1"])
def test_the_rest_of_the_reserved_networks_stays_exempt(tmp_path: pathlib.Path, ip: str) -> None:
    rule = _first_match(plan_for(config(tmp_path), strict=False).chain(Hook.NAT_OUTPUT).for_family(  # type: ignore[union-attr]
        ipaddress.ip_address(ip).version), ip)
    assert isinstance(rule.action, Return)  # type: ignore[attr-defined]


def test_only_tcp_to_link_local_is_diverted_neighbour_discovery_is_untouched(tmp_path: pathlib.Path) -> None:
    """fe80::/10 is where the host's own link-local traffic goes: only TCP is taken."""
    for strict in (False, True):
        plan = plan_for(config(tmp_path), strict=strict)
        for chain in plan.chains:
            for rule in chain.rules:
                if VIRTUAL6 in rule.match.daddr and rule.why == VIRTUAL_WHY:
                    assert rule.match.proto is Proto.TCP and not isinstance(rule.action, (Reject, Return)), rule
        assert any(r.why == VIRTUAL_WHY for c in plan.chains for r in c.for_family(6))


def test_empty_tor_virtual_networks_turns_the_diversion_off(tmp_path: pathlib.Path) -> None:
    cfg = config(tmp_path, firewall="tor_virtual_networks = ,")
    assert cfg.firewall.tor_virtual_networks == ()
    plan = plan_for(cfg, strict=True)
    assert not any(r.why == VIRTUAL_WHY or VIRTUAL4 in r.match.daddr for c in plan.chains for r in c.rules)
    blank = config(tmp_path, firewall="tor_virtual_networks = \"\"")
    assert blank.firewall.tor_virtual_networks == ()
    for backend in BACKENDS:
        assert "10.192.0.0" not in render(cfg, backend, strict=True)


def test_a_loopback_virtual_range_like_tails_is_diverted_before_loopback(tmp_path: pathlib.Path) -> None:
    """Tails sets VirtualAddrNetworkIPv4 127.192.0.0/10: the diversion precedes the loopback exemption."""
    cfg = config(tmp_path, firewall="tor_virtual_networks = 127.192.0.0/10")
    chain = plan_for(cfg, strict=False).chain(Hook.NAT_OUTPUT)
    assert chain is not None
    rules = chain.for_family(4)
    virtual = next(i for i, r in enumerate(rules) if ipaddress.ip_network("127.192.0.0/10") in r.match.daddr)
    loopback = next(i for i, r in enumerate(rules) if r.match.out_loopback)
    assert virtual < loopback and rules[virtual].action == Redirect(8675)
    assert not plan_for(cfg, strict=False).chain(Hook.NAT_OUTPUT).for_family(6)[1].match.daddr  # type: ignore[union-attr]


@pytest.mark.parametrize("value, found", [
    ("10.192.0.1/10", "has host bits set"),
    ("10.192.0.0/33", "10.192.0.0/33"),
    ("onion", "'onion'"),
    ("0.0.0.0/0", "narrower than /0"),
])
def test_bad_virtual_networks_are_config_errors_with_their_line(tmp_path: pathlib.Path, value: str,
                                                                  found: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(tmp_path, firewall=f"tor_virtual_networks = {value}")
    problem = "\n".join(e.value.problems)
    assert "fw.conf:15: [firewall] tor_virtual_networks:" in problem and found in problem, problem


def test_an_upstream_inside_the_virtual_networks_is_reported_at_its_own_address_line(
        tmp_path: pathlib.Path) -> None:
    """TCP to it would be diverted to the daemon: the mistake is usually the address."""
    with pytest.raises(ConfigError) as e:
        config(tmp_path, firewall="tor_virtual_networks = 10.192.0.0/10, 192.0.2.0/24")
    problem = "\n".join(e.value.problems)
    assert re.search(r"fw\.conf:\d+: \[upstreams\]\[\[\w+\]\] address: expected an address outside "
                     r"\[firewall\] tor_virtual_networks \(192\.0\.2\.0/24\).*found 192\.0\.2\.2", problem), problem


def test_upstreams_are_excluded_by_address_and_port_but_loopback_ones_need_no_rule(tmp_path: pathlib.Path) -> None:
    cfg = config(tmp_path, upstreams="    [[tor]]\n    type = socks5\n    address = 127.0.0.1:9050\n"
                                     "    [[v6]]\n    type = http\n    address = [2001:db8:1::2]:3128\n")
    for backend, wanted in (("iptables", "-d 192.0.2.2/32 -p tcp -m tcp --dport 1080 -j RETURN"),
                            ("ip6tables", "-d 2001:db8:1::2/128 -p tcp -m tcp --dport 3128 -j RETURN"),
                            ("nftables", "ip6 daddr 2001:db8:1::2 tcp dport 3128 return")):
        text = render(cfg, backend, strict=True)
        assert wanted in text
        assert "9050" not in text


def test_a_local_upstream_without_exempt_users_prints_a_warning(tmp_path: pathlib.Path) -> None:
    cfg = config(tmp_path, upstreams="    [[tor]]\n    type = socks5\n    address = unix:/run/tor/socks\n")
    for backend in BACKENDS:
        assert "NOTE: the upstream(s) tor run on this machine" in render(cfg, backend, strict=False)
        exempted = config(tmp_path, upstreams="    [[tor]]\n    type = socks5\n    address = unix:/run/tor/socks\n",
                          exempt=["debian-tor"])
        assert "NOTE" not in render(exempted, backend, strict=False)


def test_exempt_users_are_neither_diverted_nor_rejected(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, exempt=["debian-tor", "debian-tor"]), strict=True)
    for hook in (Hook.NAT_OUTPUT, Hook.FILTER_OUTPUT):
        chain = plan.chain(hook)
        assert chain is not None
        exempt = [r for r in chain.rules if r.match.uid == "debian-tor"]
        assert len(exempt) == 1 and isinstance(exempt[0].action, Return)
    text = render(config(tmp_path, exempt=["debian-tor"]), "iptables", strict=True)
    assert text.count("-m owner --uid-owner debian-tor -j RETURN") == 2


def test_a_listener_on_another_address_is_reached_by_dnat(tmp_path: pathlib.Path) -> None:
    cfg = config(tmp_path, daemon="listen = 192.0.2.1, ::1\nport = 9040")
    plan = plan_for(cfg, strict=False)
    assert targets(plan, Hook.NAT_OUTPUT, 4)[-1] == Dnat(ipaddress.ip_address("192.0.2.1"), 9040)
    assert targets(plan, Hook.NAT_OUTPUT, 6)[-1] == Redirect(9040)
    assert "-j DNAT --to-destination 192.0.2.1:9040" in render(cfg, "iptables", strict=False)
    nft = render(cfg, "nftables", strict=False)
    assert "meta nfproto ipv4 meta l4proto tcp dnat ip to 192.0.2.1:9040" in nft
    assert "meta nfproto ipv6 meta l4proto tcp redirect to :9040" in nft


def test_no_ipv6_listener_still_diverts_ipv6_so_it_fails_closed(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, daemon="listen = 127.0.0.1,"), strict=True)
    assert targets(plan, Hook.NAT_OUTPUT, 6)[-1] == Redirect(8675)
    assert any("no IPv6 address" in n for n in plan.notes)


# ---- strict mode ----------------------------------------------------------------------


def test_not_strict_touches_only_tcp(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, dns="127.0.0.1:5353"), strict=False)
    assert plan.chain(Hook.FILTER_OUTPUT) is None
    chain = plan.chain(Hook.NAT_OUTPUT)
    assert chain is not None and all(r.match.dport != 53 for r in chain.rules)
    for backend in BACKENDS:
        text = render(config(tmp_path), backend, strict=False)
        assert "REJECT" not in text and "reject" not in text and "*filter" not in text


def test_strict_filter_allows_loopback_upstreams_and_ndp_then_rejects_with_a_reply(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path), strict=True)
    chain = plan.chain(Hook.FILTER_OUTPUT)
    assert chain is not None
    assert chain.rules[0].match.out_loopback
    assert [r.action for r in chain.rules[-3:]] == [
        Reject(RejectWith.TCP_RESET), Reject(RejectWith.PORT_UNREACHABLE), Reject(RejectWith.ADMIN_PROHIBITED)]
    # The last rule matches everything, in both families: nothing falls through.
    assert chain.rules[-1].match == type(chain.rules[-1].match)()
    assert not any(r.match.ndp for r in chain.rules), "no IPv6 is let out: no neighbour discovery either"
    # The service user has no blanket exception: it reaches the upstreams only.
    assert all(r.match.uid is None for r in chain.rules)
    four = render(config(tmp_path), "iptables", strict=True)
    assert "-A METAPROXY -j REJECT --reject-with icmp-admin-prohibited\nCOMMIT" in four
    six = render(config(tmp_path), "ip6tables", strict=True)
    assert "-A METAPROXY -p udp -j REJECT --reject-with icmp6-port-unreachable" in six
    assert "icmpv6" not in four
    assert "counter reject with icmpx type admin-prohibited\n\t}" in render(config(tmp_path), "nftables", strict=True)


def test_strict_without_resolver_rejects_dns_and_keeps_tcp_53_from_the_proxy(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path), strict=True)
    chain = plan.chain(Hook.NAT_OUTPUT)
    assert chain is not None
    dns = [r for r in chain.rules if r.match.dport == 53]
    assert len(dns) == 1 and dns[0].match.family is None and isinstance(dns[0].action, Return)
    assert any("no [firewall] dns" in n for n in plan.notes)
    text = render(config(tmp_path), "iptables", strict=True)
    assert text.index("--dport 53 -j RETURN") < text.index("-A METAPROXY -p tcp -j REDIRECT --to-ports 8675")


def test_strict_loopback_resolver_is_redirected_in_its_family_only(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, dns="127.0.0.1:5353"), strict=True)
    assert Redirect(5353) in targets(plan, Hook.NAT_OUTPUT, 4)
    assert Redirect(5353) not in targets(plan, Hook.NAT_OUTPUT, 6)
    four = render(config(tmp_path, dns="127.0.0.1:5353"), "iptables", strict=True)
    assert "-p udp -m udp --dport 53 -j REDIRECT --to-ports 5353" in four
    assert "-p tcp -m tcp --dport 53 -j REDIRECT --to-ports 5353" in four
    six = render(config(tmp_path, dns="127.0.0.1:5353"), "ip6tables", strict=True)
    assert "-p tcp -m tcp --dport 53 -j RETURN" in six and "5353" not in six.split("*nat")[1]


def test_strict_ipv6_resolver_elsewhere_is_dnatted_and_allowed_out(tmp_path: pathlib.Path) -> None:
    cfg = config(tmp_path, dns="[2001:db8:1::53]:53")
    six = render(cfg, "ip6tables", strict=True)
    assert "-p udp -m udp --dport 53 -j DNAT --to-destination [2001:db8:1::53]:53" in six
    assert "-d 2001:db8:1::53/128 -p udp -m udp --dport 53 -j RETURN" in six
    nft = render(cfg, "nftables", strict=True)
    assert "meta nfproto ipv6 udp dport 53 dnat ip6 to [2001:db8:1::53]:53" in nft
    assert "ip6 daddr 2001:db8:1::53 udp dport 53 return" in nft


def test_dns_rules_come_before_the_reserved_networks(tmp_path: pathlib.Path) -> None:
    """A query to the LAN's resolver (192.168.1.1) goes to the configured resolver too."""
    text = render(config(tmp_path, dns="127.0.0.1:5353"), "iptables", strict=True)
    assert text.index("--dport 53 -j REDIRECT") < text.index("-d 192.168.0.0/16 -j RETURN")


# ---- TPROXY -----------------------------------------------------------------------------


def test_tproxy_marks_in_mangle_output_and_hands_over_in_prerouting(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, daemon="mode = tproxy"), strict=False)
    assert plan.chain(Hook.NAT_OUTPUT) is None
    mark = targets(plan, Hook.MANGLE_OUTPUT, 4)[-1]
    assert isinstance(mark, SetMark)
    handover = targets(plan, Hook.MANGLE_PREROUTING, 6)
    assert handover == [Tproxy(ipaddress.ip_address("::1"), 8675, mark.mark)]
    text = render(config(tmp_path, daemon="mode = tproxy"), "iptables", strict=False)
    assert "-A METAPROXY_TPROXY -i lo -p tcp -m mark --mark 0x8675 -j TPROXY --on-ip 127.0.0.1" in text
    assert "#   ip -4 rule add fwmark 0x8675 lookup 8675" in text
    assert "#   ip -4 route add local 0.0.0.0/0 dev lo table 8675" in text


def test_tproxy_strict_dns_goes_through_nat_and_tcp_53_is_not_marked(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, daemon="mode = tproxy", dns="192.0.2.53:53"), strict=True)
    assert Dnat(ipaddress.ip_address("192.0.2.53"), 53) in targets(plan, Hook.NAT_OUTPUT, 4)
    mangle = plan.chain(Hook.MANGLE_OUTPUT)
    assert mangle is not None
    dns = [r for r in mangle.rules if r.match.dport == 53]
    assert len(dns) == 1 and isinstance(dns[0].action, Return)
    assert mangle.rules.index(dns[0]) < len(mangle.rules) - 1


# ---- render: checked names, the registry, the shipped config -----------------------------


def test_unknown_backend_is_refused_with_the_choices(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="expected one of iptables, ip6tables, nftables"):
        render(config(tmp_path), "pf", strict=False)


@pytest.mark.parametrize("user", ['a"b', "x y", "evil\n-A OUTPUT -j ACCEPT", "", "-j"])
def test_a_user_name_unfit_for_a_rule_is_a_config_error(tmp_path: pathlib.Path, user: str) -> None:
    cfg = dataclasses.replace(config(tmp_path), firewall=FirewallSettings(exempt_users=(user,)))
    with pytest.raises(ConfigError, match=r"\[firewall\] exempt_users: expected a user name"):
        render(cfg, "nftables", strict=False)


def test_the_service_user_is_checked_too(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "u.conf"
    path.write_text('[daemon]\nuser = "a b"\n[upstreams]\n    [[t]]\n    type = socks5\n'
                    "    address = 127.0.0.1:9050\n[routes]\n* = t\n")
    # The loader checks the name before the rules are built, so the error names the line.
    with pytest.raises(ConfigError, match=r"u\.conf:2: \[daemon\] user: expected a user name"):
        render(load(str(path)), "iptables", strict=False)


def test_shipped_config_renders_for_every_backend() -> None:
    shipped = load(str(ROOT / "etc/subgraph_metaproxy.conf"))
    for backend in BACKENDS:
        for strict in (False, True):
            assert "8675" in render(shipped, backend, strict=strict)


def test_strict_filter_allows_what_redirect_rewrote_to_loopback(tmp_path: pathlib.Path) -> None:
    """A filter rule sees the pre-NAT output interface: "-o lo" alone would reset every diverted connection."""
    chain = plan_for(config(tmp_path), strict=True).chain(Hook.FILTER_OUTPUT)
    assert chain is not None
    allowed = [r.match.daddr for r in chain.rules if isinstance(r.action, Return) and r.match.daddr]
    assert (ipaddress.ip_network("127.0.0.0/8"),) in allowed and (ipaddress.ip_network("::1/128"),) in allowed
    text = render(config(tmp_path, daemon="listen = 192.0.2.1, ::1"), "iptables", strict=True)
    assert "-A METAPROXY -d 192.0.2.1/32 -p tcp -m tcp --dport 8675 -j RETURN" in text.split("*nat")[0]


def test_tproxy_strict_allows_the_mark_and_guards_postrouting(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, daemon="mode = tproxy"), strict=True)
    strict = plan.chain(Hook.FILTER_OUTPUT)
    assert strict is not None and any(r.match.mark is not None for r in strict.rules)
    guard = plan.chain(Hook.MANGLE_POSTROUTING)
    assert guard is not None and [type(r.action).__name__ for r in guard.rules] == ["Drop"]
    assert "-A METAPROXY_GUARD ! -o lo -m mark --mark 0x8675 -j DROP" in \
        render(config(tmp_path, daemon="mode = tproxy"), "iptables", strict=False)
    assert 'oifname != "lo" meta mark 0x8675 counter drop' in \
        render(config(tmp_path, daemon="mode = tproxy"), "nftables", strict=False)


@pytest.mark.parametrize(("upstreams", "dns", "exempt", "allowed"), [
    ("", "", [], False),
    ("", "[::1]:5353", [], False),
    ("", "[2001:db8:1::53]:53", [], True),
    ("    [[v6]]\n    type = socks5\n    address = [2001:db8:1::2]:1080\n", "", [], True),
    ("", "", ["debian-tor"], True),
])
def test_neighbour_discovery_only_when_something_ipv6_is_let_out(
        tmp_path: pathlib.Path, upstreams: str, dns: str, exempt: list[str], allowed: bool) -> None:
    """Otherwise even the kernel's solicitations, which carry a MAC-derived address, stay in."""
    text = render(config(tmp_path, upstreams=upstreams, dns=dns, exempt=exempt), "ip6tables", strict=True)
    assert ("--icmpv6-type neighbour-solicitation -m hl --hl-eq 255 -j RETURN" in text) is allowed
