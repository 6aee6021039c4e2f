"""The original program's JSON format keeps working, and maps to configobj text."""

from __future__ import annotations

import json
import pathlib

import pytest

from metaproxy.config import load
from metaproxy.config.legacy import equivalent_text
from metaproxy.config.loader import parse_configobj
from metaproxy.config.model import Isolation, UpstreamType
from metaproxy.errors import ConfigError

ORIGINAL = {"Relays": [
    {"destinationport": "80", "relaytype": "HTTP_CONNECT", "relayip": "192.0.2.2", "relayport": "3128"},
    {"destinationport": "443", "relaytype": "SOCKS5", "relayip": "unix:/run/tor/socks", "relayport": "0"},
    {"destinationport": "*", "relaytype": "SOCKS5", "relayip": "127.0.0.1", "relayport": "9050"},
]}


def test_original_json_runs_unchanged(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "metaproxy.json"
    path.write_text(json.dumps(ORIGINAL, indent=2))
    config = load(str(path))
    assert config.legacy
    http = config.upstream_for(80)
    tor_unix = config.upstream_for(443)
    tor = config.upstream_for(22)
    assert http is not None and http.type is UpstreamType.HTTP and str(http.address) == "192.0.2.2:3128"
    assert tor_unix is not None and str(tor_unix.address) == "unix:/run/tor/socks"
    assert tor is not None and tor.isolation.units == {Isolation.CONNECTION}, tor.isolation
    assert tor.connect_timeout == 120 and http.connect_timeout == 10


def test_equivalent_text_loads_to_the_same_routes(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "metaproxy.json"
    path.write_text(json.dumps(ORIGINAL))
    legacy = load(str(path))
    modern = parse_configobj("equivalent", equivalent_text(legacy))
    for port in (80, 443, 22, 65535):
        a, b = legacy.upstream_for(port), modern.upstream_for(port)
        assert a is not None and b is not None
        assert (a.type, a.address, a.connect_timeout) == (b.type, b.address, b.connect_timeout)
        if a.type is UpstreamType.SOCKS5:  # isolation credentials go to socks5 only
            assert a.isolation == b.isolation


def test_json_syntax_error_names_line_and_column(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"Relays": [\n  {"destinationport": "80",,}\n]}')
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert caught.value.problems[0].startswith(f"{path}:2:28: JSON syntax error")


@pytest.mark.parametrize("relay, expected", [
    ({"destinationport": "80", "relaytype": "SOCKS4", "relayip": "127.0.0.1", "relayport": "1"}, "relaytype"),
    ({"destinationport": "99999", "relaytype": "SOCKS5", "relayip": "127.0.0.1", "relayport": "1"}, "out of range"),
    ({"destinationport": "80", "relaytype": "SOCKS5", "relayip": "tor.example", "relayport": "1"}, "host names"),
    ({"destinationport": "80", "relaytype": "HTTP_CONNECT", "relayip": "unix:/x", "relayport": "0"}, "unix:"),
    ({"destinationport": "80"}, "missing"),
])
def test_bad_legacy_relays_are_clear_errors(tmp_path: pathlib.Path, relay: dict, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"Relays": [relay]}))
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert expected in caught.value.problems[0] and "Relays[0]" in caught.value.problems[0]
