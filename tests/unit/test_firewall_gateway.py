"""Gateway mode ([firewall] lan_interfaces): the config key, -t, and what the rules do for LAN clients."""

from __future__ import annotations

import ipaddress
import pathlib
import re

import pytest

from metaproxy.cli import main
from metaproxy.config import load
from metaproxy.config.model import Config
from metaproxy.errors import ConfigError
from metaproxy.firewall import BACKENDS, plan_for, render
from metaproxy.firewall.rules import Dnat, Drop, Hook, Plan, Redirect, Reject, Return, Rule, Tproxy

LAN = "br0"


def config(tmp_path: pathlib.Path, *, listen: str = "0.0.0.0, ::", mode: str = "redirect",
           dns: str = "203.0.113.1:5353", lan: str = LAN) -> Config:
    path = tmp_path / "gw.conf"
    path.write_text(f"""
[daemon]
listen = {listen}
mode = {mode}
user = nobody
[upstreams]
    [[tor]]
    type = socks5
    address = 192.0.2.2:1081
    isolation = client
[routes]
* = tor
[firewall]
dns = "{dns}"
lan_interfaces = {lan}
""")
    return load(str(path))


def rules(plan: Plan, hook: Hook, family: int | None = None) -> tuple[Rule, ...]:
    chain = plan.chain(hook)
    assert chain is not None, f"no {hook.value} chain"
    return chain.rules if family is None else chain.for_family(family)


# ---- the config key and -t -------------------------------------------------------------

@pytest.mark.parametrize("name", ['"a b"', "*", "lo", "eth0+", "x" * 16, '"br0;x"', "-i"])
def test_an_interface_name_unfit_for_a_rule_is_a_config_error_with_its_line(tmp_path: pathlib.Path,
                                                                             name: str) -> None:
    with pytest.raises(ConfigError, match=r"gw\.conf:\d+: \[firewall\] lan_interfaces: expected an interface name"):
        config(tmp_path, lan=name)


def test_names_and_prefixes_are_accepted_once_each(tmp_path: pathlib.Path) -> None:
    cfg = config(tmp_path, lan="br0, vnet*, br0, veth-sb.1")
    assert cfg.firewall.lan_interfaces == ("br0", "vnet*", "veth-sb.1")


def test_redirect_gateway_listening_on_loopback_only_is_refused(tmp_path: pathlib.Path) -> None:
    """PREROUTING's REDIRECT goes to the receiving interface's address: a loopback listener never sees it."""
    with pytest.raises(ConfigError, match=r"\[daemon\] listen: expected an address LAN clients reach"):
        config(tmp_path, listen="127.0.0.1, ::1")
    assert config(tmp_path, listen="127.0.0.1, ::1", mode="tproxy").firewall.lan_interfaces == (LAN,)
    assert config(tmp_path, listen="127.0.0.1, ::1, 203.0.113.1").daemon.listen[-1] == "203.0.113.1"


def test_dash_t_prints_what_gateway_mode_will_do(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    config(tmp_path, dns="127.0.0.1:5353")
    assert main(["-t", "-c", str(tmp_path / "gw.conf")]) == 0
    out = capsys.readouterr().out
    assert f"gateway: TCP from clients on {LAN} is diverted to port 8675 (redirect, in PREROUTING)" in out
    assert "one Tor circuit per client address through tor" in out
    assert "route_localnet=1" in out, "a loopback resolver needs route_localnet: -t must say so"


def test_dash_t_prints_nothing_about_a_gateway_without_lan_interfaces(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    config(tmp_path, lan=",")
    assert main(["-t", "-c", str(tmp_path / "gw.conf")]) == 0
    assert "gateway" not in capsys.readouterr().out


# ---- diversion -------------------------------------------------------------------------

def test_lan_dns_goes_first_then_the_gateway_itself_and_reserved_networks_then_the_daemon(
        tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path), strict=False)
    chain = rules(plan, Hook.NAT_PREROUTING, 4)
    assert all(r.match.in_interface == LAN for r in chain)
    assert [r.action for r in chain[:2]] == [Dnat(ipaddress.ip_address("203.0.113.1"), 5353)] * 2
    # Tor's virtual addresses before any exemption: they lie inside 10.0.0.0/8.
    assert chain[2].match.daddr == (ipaddress.ip_network("10.192.0.0/10"),) and chain[2].action == Redirect(8675)
    assert chain[3].match.daddr_local and isinstance(chain[3].action, Return)
    assert isinstance(chain[4].action, Return) and ipaddress.ip_network("10.0.0.0/8") in chain[4].match.daddr
    assert chain[-1].action == Redirect(8675), "a wildcard listener takes REDIRECT's interface address"


def test_a_listener_on_the_lan_address_is_reached_by_dnat(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, listen="127.0.0.1, ::1, 203.0.113.1"), strict=False)
    assert rules(plan, Hook.NAT_PREROUTING, 4)[-1].action == Dnat(ipaddress.ip_address("203.0.113.1"), 8675)
    assert rules(plan, Hook.NAT_PREROUTING, 6)[-1].action == Redirect(8675)
    assert any("no IPv6 address that LAN clients reach" in note for note in plan.notes)


def test_tproxy_gateway_diverts_in_mangle_and_keeps_only_dns_in_nat(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, listen="127.0.0.1, ::1", mode="tproxy"), strict=False)
    lan = [r for r in rules(plan, Hook.MANGLE_PREROUTING) if r.match.in_interface == LAN]
    assert [type(r.action) for r in lan[-2:]] == [Tproxy, Tproxy]
    # Tor's virtual addresses are handed to the daemon first, before the gateway's own and reserved ones.
    assert [type(r.action) for r in lan[:2]] == [Tproxy, Tproxy]
    assert [r.match.daddr for r in lan[:2]] == [(ipaddress.ip_network("10.192.0.0/10"),),
                                                 (ipaddress.ip_network("fe80::/10"),)]
    nat = rules(plan, Hook.NAT_PREROUTING)
    assert not any(isinstance(r.action, Redirect) for r in nat), "TPROXY: the nat chain only translates DNS"


def test_without_a_resolver_lan_dns_is_rejected_even_without_strict(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, dns=""), strict=False)
    for hook in (Hook.FILTER_FORWARD, Hook.FILTER_INPUT):
        rejected = {(r.match.proto, r.match.dport) for r in rules(plan, hook) if isinstance(r.action, Reject)}
        assert {(p, 53) for p in {r.match.proto for r in rules(plan, hook)} if p is not None} <= rejected
    assert not any(r.match.proto is None and isinstance(r.action, Reject) for r in rules(plan, Hook.FILTER_FORWARD)), \
        "without --strict only DNS is rejected"


def test_a_loopback_resolver_needs_route_localnet_and_the_notes_say_so(tmp_path: pathlib.Path) -> None:
    for backend in BACKENDS:
        text = render(config(tmp_path, dns="127.0.0.1:5353"), backend, strict=True)
        assert "route_localnet=1" in text and "never sets it" in text


# ---- strict -----------------------------------------------------------------------------

def test_strict_forward_rejects_from_the_lan_and_drops_to_it(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path), strict=True)
    forward = rules(plan, Hook.FILTER_FORWARD)
    last_from = [r for r in forward if r.match.in_interface == LAN][-1]
    assert last_from.match.proto is None and isinstance(last_from.action, Reject)
    assert forward[-1].match.out_interface == LAN and isinstance(forward[-1].action, Drop)


def test_strict_input_opens_only_the_daemon_dns_and_neighbour_discovery(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path), strict=True)
    allowed = [r.match for r in rules(plan, Hook.FILTER_INPUT) if isinstance(r.action, Return)]
    assert {(m.proto.value if m.proto else None, m.dport) for m in allowed if not m.ndp} == \
        {("udp", 5353), ("tcp", 5353), ("tcp", 8675)}
    assert [m.family for m in allowed if m.ndp] == [6]
    tproxy = plan_for(config(tmp_path, listen="127.0.0.1, ::1", mode="tproxy"), strict=True)
    assert any(r.match.mark is not None and isinstance(r.action, Return) for r in rules(tproxy, Hook.FILTER_INPUT))


def test_strict_output_lets_this_host_answer_its_lan_clients(tmp_path: pathlib.Path) -> None:
    output = rules(plan_for(config(tmp_path), strict=True), Hook.FILTER_OUTPUT)
    index = next(i for i, r in enumerate(output) if r.match.out_interface == LAN)
    assert isinstance(output[index].action, Return)
    assert all(isinstance(r.action, Reject) for r in output[index + 1:])


# ---- spelling ---------------------------------------------------------------------------

def test_a_prefix_is_spelled_plus_for_iptables_and_star_for_nftables(tmp_path: pathlib.Path) -> None:
    cfg = config(tmp_path, lan="vnet*")
    assert "-A METAPROXY_LAN -i vnet+ -m addrtype --dst-type LOCAL -j RETURN" in render(cfg, "iptables", strict=True)
    assert 'iifname "vnet*" fib daddr type local return' in render(cfg, "nftables", strict=True)


def test_iptables_removal_names_every_gateway_chain(tmp_path: pathlib.Path) -> None:
    text = render(config(tmp_path), "iptables", strict=True, unload=True)
    for line in ("-D PREROUTING -j METAPROXY_LAN", "-X METAPROXY_LAN", "-D FORWARD -j METAPROXY_FORWARD",
                 "-X METAPROXY_FORWARD", "-D INPUT -j METAPROXY_INPUT", "-X METAPROXY_INPUT"):
        assert line in text


def test_without_lan_interfaces_no_gateway_chain_exists(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path, lan=","), strict=True)
    assert {c.hook for c in plan.chains} == {Hook.NAT_OUTPUT, Hook.FILTER_OUTPUT}


@pytest.mark.parametrize("dns", ["203.0.113.1:5353", "192.0.2.53:53", "[2001:db8:3::1]:5353"])
def test_each_iptables_half_names_addresses_of_its_own_family_only(tmp_path: pathlib.Path, dns: str) -> None:
    """ip6tables-restore refuses an IPv4 address (and iptables-restore an IPv6 one): the whole load fails."""
    cfg = config(tmp_path, dns=dns)
    for strict in (False, True):
        v4, v6 = render(cfg, "iptables", strict=strict), render(cfg, "ip6tables", strict=strict)
        assert not re.search(r"-[sd] [0-9a-f]*:", "\n".join(x for x in v4.splitlines() if not x.startswith("#")))
        assert not re.search(r"-[sd] \d+\.\d+\.\d+\.\d+", v6)
