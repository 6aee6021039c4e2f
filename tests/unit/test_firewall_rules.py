"""The rule vocabulary (metaproxy.firewall.rules): the networks the rules leave alone, and
Tor's virtual ones they divert."""

from __future__ import annotations

import ipaddress
import pathlib

import pytest

from metaproxy.config.model import FirewallSettings
from metaproxy.firewall.rules import DEFAULT_RESERVED, TOR_VIRTUAL_DEFAULT
from tests.unit.firewall_fixtures import config


def test_reserved_networks_are_the_originals_plus_cgnat_and_ipv6_equivalents() -> None:
    nets = {ipaddress.ip_network(n) for n in DEFAULT_RESERVED}
    for n in ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
              "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8"):
        assert ipaddress.ip_network(n) in nets


@pytest.mark.parametrize("address", ["192.0.2.7", "198.51.100.2", "203.0.113.9", "2001:db8:2::2"])
def test_documentation_networks_are_diverted_not_excluded(address: str) -> None:
    """The lab plays the internet on RFC 5737 / RFC 3849 addresses: they must be diverted."""
    ip = ipaddress.ip_address(address)
    assert not any(ip in ipaddress.ip_network(n) for n in DEFAULT_RESERVED)


def test_default_virtual_networks_are_tors_own_defaults(tmp_path: pathlib.Path) -> None:
    """10.192.0.0/10 and fe80::/10: Tor's VirtualAddrNetworkIPv4/IPv6 defaults, in config, spec and rules."""
    assert config(tmp_path).firewall.tor_virtual_networks == TOR_VIRTUAL_DEFAULT == ("10.192.0.0/10", "fe80::/10")
    assert FirewallSettings().tor_virtual_networks == TOR_VIRTUAL_DEFAULT
