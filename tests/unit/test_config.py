"""The configobj loader: typed values, one clear line per problem, never a traceback."""

from __future__ import annotations

import pathlib

import pytest

from metaproxy.config import load
from metaproxy.config.model import Isolation, RedirectMode, UnixAddress, UpstreamType
from metaproxy.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def write(tmp_path: pathlib.Path, text: str, name: str = "m.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems(path: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path)
    return caught.value.problems


def test_shipped_default_sends_every_port_to_tor_socksport() -> None:
    config = load(str(ROOT / "etc/subgraph_metaproxy.conf"))
    tor = config.upstream_for(443)
    assert tor is not None and tor.type is UpstreamType.SOCKS5
    assert str(tor.address) == "127.0.0.1:9050"
    assert tor.isolation.units == {Isolation.USER, Isolation.DESTINATION} and tor.isolation.period == 600
    assert tor.connect_timeout == 120
    assert config.daemon.listen == ("127.0.0.1", "::1") and config.daemon.port == 8675
    assert config.daemon.mode is RedirectMode.REDIRECT


def test_routes_single_ports_beat_ranges_which_beat_the_fallback(tmp_path: pathlib.Path) -> None:
    config = load(write(tmp_path, """
[upstreams]
  [[a]]
  type = socks5
  address = [2001:db8::1]:9050
  [[b]]
  type = http
  address = 192.0.2.2:3128
  [[c]]
  type = socks4a
  address = 192.0.2.3:1080
[routes]
"80, 443" = b
8000-8100 = c
8080 = a
* = a
"""))
    assert config.routes.lookup(80) == "b" and config.routes.lookup(443) == "b"
    assert config.routes.lookup(8080) == "a"
    assert config.routes.lookup(8000) == "c" and config.routes.lookup(8100) == "c"
    assert config.routes.lookup(22) == "a"
    assert str(config.upstreams["a"].address) == "[2001:db8::1]:9050"


def test_no_fallback_means_unmatched_ports_have_no_upstream(tmp_path: pathlib.Path) -> None:
    config = load(write(tmp_path, "[upstreams]\n[[t]]\ntype = socks5\naddress = unix:/run/tor/socks\n"
                                  "[routes]\n80 = t\n"))
    assert config.upstream_for(81) is None
    assert config.upstreams["t"].address == UnixAddress("/run/tor/socks")
    assert any("refused" in line for line in config.relay_table())


def test_every_mistake_is_one_line_with_file_line_section_key(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """[daemon]
port = 99999
mode = transparent
colour = blue
[upstreams]
  [[t]]
  type = socks5
  address = 127.0.0.1:9050
""")
    found = problems(path)
    assert len(found) == 3
    assert f"{path}:2: [daemon] port: expected an integer from 1 to 65535, found '99999'" in found
    assert any(line.startswith(f"{path}:3: [daemon] mode:") and "'transparent'" in line for line in found)
    assert any(line.startswith(f"{path}:4: [daemon] colour:") and "unknown key" in line for line in found)


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


def test_unix_socket_only_for_socks5(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[upstreams]\n  [[h]]\n  type = http\n  address = unix:/run/x\n[routes]\n* = h\n")
    (line,) = problems(path)
    assert "[upstreams][[h]] address" in line and "unix: works only for socks5" in line


def test_route_to_an_undefined_upstream(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[upstreams]\n  [[t]]\n  type = socks5\n  address = 127.0.0.1:9050\n"
                           "[routes]\n80 = nowhere\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}:6: [routes] 80:") and "'nowhere'" in line and "(t)" in line


@pytest.mark.parametrize("key, reason", [
    ("0", "out of range"), ("65536", "out of range"), ("http", "not a number"),
    ("200-100", "backwards"),
])
def test_bad_route_keys(tmp_path: pathlib.Path, key: str, reason: str) -> None:
    path = write(tmp_path, f"[upstreams]\n  [[t]]\n  type = socks5\n  address = 127.0.0.1:9050\n"
                           f"[routes]\n{key} = t\n")
    (line,) = problems(path)
    assert "[routes]" in line and reason in line


def test_overlapping_ranges_are_refused(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[upstreams]\n  [[t]]\n  type = socks5\n  address = 127.0.0.1:9050\n"
                           "[routes]\n1-100 = t\n50-60 = t\n")
    (line,) = problems(path)
    assert "overlaps" in line


def test_syntax_error_names_the_line(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[daemon]\nport = 1\n[upstreams\n")
    found = problems(path)
    assert found and found[0].startswith(f"{path}:3:")


def test_unreadable_and_binary_files_are_clear_errors(tmp_path: pathlib.Path) -> None:
    assert "cannot read" in problems(str(tmp_path / "missing.conf"))[0]
    binary = tmp_path / "b.conf"
    binary.write_bytes(b"[daemon]\nport = \xff\n")
    assert "UTF-8" in problems(str(binary))[0]


def test_password_never_appears_in_repr_or_table(tmp_path: pathlib.Path) -> None:
    config = load(write(tmp_path, "[upstreams]\n  [[t]]\n  type = socks5\n  address = 127.0.0.1:9050\n"
                                  "  username = alice\n  password = s3cret-pw\n[routes]\n* = t\n"))
    assert "s3cret-pw" not in repr(config) and "s3cret-pw" not in "\n".join(config.relay_table())


def test_firewall_exempt_users_reach_the_rules(tmp_path: pathlib.Path) -> None:
    from metaproxy.firewall import render
    config = load(write(tmp_path, "[upstreams]\n  [[t]]\n  type = socks5\n  address = 127.0.0.1:9050\n"
                                  "[routes]\n* = t\n[firewall]\nexempt_users = debian-tor\n"))
    assert config.firewall.exempt_users == ("debian-tor",)
    rules = render(config, "iptables", strict=True)
    assert "--uid-owner debian-tor" in rules and "exempt_users (e.g. debian-tor)" not in rules
    assert load(str(ROOT / "etc/subgraph_metaproxy.conf")).firewall.exempt_users == ()
