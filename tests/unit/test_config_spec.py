"""The configspec (metaproxy.config.spec): every key has words for error messages, and its
defaults are the model's."""

from __future__ import annotations

import dataclasses

import configobj

from metaproxy.config.loader import parse_configobj
from metaproxy.config.model import DEFAULT_ISOLATION, DaemonSettings, FirewallSettings
from metaproxy.config.spec import CONFIGSPEC, EXPECTED

SPEC = configobj.ConfigObj(CONFIGSPEC.splitlines(), list_values=False, _inspec=True)


def _keys(section: configobj.Section) -> set[str]:
    return {key for key in section.scalars if key != "__many__"}


def test_every_key_has_an_expected_text_and_every_text_a_key() -> None:
    """A problem line says what was expected in words, never 'a valid value'."""
    keys = _keys(SPEC["daemon"]) | _keys(SPEC["upstreams"]["__many__"]) | _keys(SPEC["firewall"])
    assert keys - set(EXPECTED) == set(), "keys with no EXPECTED text"
    assert set(EXPECTED) - keys == set(), "EXPECTED texts for keys the spec no longer has"
    assert all(text and not text.endswith(".") for text in EXPECTED.values())


def test_the_spec_has_the_model_s_sections_and_keys() -> None:
    assert set(SPEC) == {"daemon", "upstreams", "routes", "firewall"}
    assert _keys(SPEC["daemon"]) == {f.name for f in dataclasses.fields(DaemonSettings)}
    assert _keys(SPEC["firewall"]) == {f.name for f in dataclasses.fields(FirewallSettings)}


def test_the_spec_defaults_are_the_model_defaults() -> None:
    """An empty [daemon] and [firewall] load to the dataclasses' own defaults, an upstream that
    sets only type and address to the default isolation."""
    config = parse_configobj("m.conf", "[upstreams]\n[[t]]\ntype = socks5\naddress = 127.0.0.1:9050\n")
    assert config.daemon == DaemonSettings() and config.firewall == FirewallSettings()
    upstream = config.upstreams["t"]
    assert upstream.isolation == DEFAULT_ISOLATION and (upstream.username, upstream.password) == ("", "")
