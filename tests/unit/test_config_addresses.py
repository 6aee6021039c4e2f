"""The address and name forms the config accepts (metaproxy.config.addresses): IP literals
only, never host names, and the user-name rule the firewall rules share."""

from __future__ import annotations

import pathlib

import pytest

from metaproxy.config.addresses import is_interface, is_user_name, parse_inet
from metaproxy.errors import EX_CONFIG
from metaproxy.firewall.plan import build
from metaproxy.firewall.rules import Mode, PlanError, Settings
from tests.unit.config_fixtures import ROUTES, UPSTREAM, problems, run_cli, write


# ---- addresses ---------------------------------------------------------------------------

@pytest.mark.parametrize("address, reason", [
    ("tor.example:9050", "host names are not accepted"),
    ("127.0.0.1:70000", "out of range"),
    ("127.0.0.1", "port is missing"),
    ("2001:db8::1:9050", "brackets"),
    ("unix:relative/path", "absolute path"),
])
def test_bad_upstream_addresses_are_named(tmp_path: pathlib.Path, address: str, reason: str) -> None:
    path = write(tmp_path, f"[upstreams]\n  [[t]]\n  type = socks5\n  address = {address}\n[routes]\n* = t\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}:4: [upstreams][[t]] address:") and reason in line


@pytest.mark.parametrize("text, host, port", [
    ("192.0.2.1:80", "192.0.2.1", 80),
    (" [2001:DB8::1]:443 ", "2001:db8::1", 443),
])
def test_ip_literals_are_read_and_written_back_in_canonical_form(text: str, host: str, port: int) -> None:
    address = parse_inet(text)
    assert (address.host, address.port) == (host, port)


@pytest.mark.parametrize("name, ok", [("eth0", True), ("br-lan", True), ("wlan*", True), ("lo", False),
                                      ("lo*", False), ("*", False), ("eth+", False), ("a" * 16, False),
                                      ("eth0 ", False), ('e"0', False)])
def test_an_interface_is_a_name_or_prefix_the_tools_read_literally_never_loopback(name: str, ok: bool) -> None:
    assert is_interface(name) is ok


# ---- user names: the rule the firewall rules paste names under ---------------------------

@pytest.mark.parametrize("section, key, value", [
    ("firewall", "exempt_users", '"debian tor"'),
    ("firewall", "exempt_users", "debian-tor, -j"),
    ("daemon", "user", '"a b"'),
])
@pytest.mark.parametrize("argv", [("-t",), ("--print-rules", "iptables"), ("--print-rules", "nftables", "--strict")],
                         ids=["t", "print-rules", "print-rules-strict"])
def test_a_user_name_the_rules_refuse_is_refused_by_t_with_its_line(
        tmp_path: pathlib.Path, section: str, key: str, value: str, argv: tuple[str, ...]) -> None:
    """``exempt_users = "debian tor"`` passed -t and then failed metaproxy-firewall.service."""
    text = UPSTREAM + ROUTES + f"[{section}]\n{key} = {value}\n"
    path = write(tmp_path, text)
    line = text.count("\n")
    code, out, err = run_cli(*argv, "-c", str(path))
    assert (code, out) == (EX_CONFIG, ""), err
    assert err.startswith(f"{path}:{line}: [{section}] {key}: expected a user name"), err


def test_t_accepts_what_the_rules_accept(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, UPSTREAM + ROUTES + "[firewall]\nexempt_users = debian-tor, 108, tor$\n")
    assert run_cli("-t", "-c", str(path))[0] == 0
    assert run_cli("--print-rules", "nftables", "--strict", "-c", str(path))[0] == 0


@pytest.mark.parametrize("name", ["debian-tor", "_metaproxy", "108", "Tor.user", "x$", "a" * 32, "a" * 33,
                                  "", "-j", ".x", "a b", "a\nb", "a\"b", "tor$$", "é"])
def test_the_config_and_the_rules_agree_on_user_names(name: str) -> None:
    """The loader's rule and metaproxy/firewall/plan.py's stay the same rule."""
    config_accepts = is_user_name(name)
    try:
        build(Settings(port=8675, mode=Mode.REDIRECT, strict=False, service_user="nobody", exempt_users=(name,)))
        rules_accept = True
    except PlanError:
        rules_accept = False
    assert config_accepts == rules_accept

