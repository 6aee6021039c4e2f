"""The loader (metaproxy.config.loader): the file read safely, typed values, one clear line
per problem (file, line, section, key, what was expected, what was found), never a traceback.

Its other tests: test_config_loader_fuzz.py (generated configs through -t) and
test_config_loader_tor_defaults.py (the defaults that suit Tor).
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

from metaproxy.config import load
from metaproxy.config.model import Isolation, RedirectMode, UnixAddress, UpstreamType
from metaproxy.errors import EX_CONFIG
from tests.unit.config_fixtures import ROUTES, UPSTREAM, problems, run_cli, write

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
       "LANG": "C.UTF-8"}


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


# ---- the file itself: a regular file, opened without blocking --------------------------

def test_a_fifo_is_refused_at_once_and_never_opened_for_a_blocking_read(tmp_path: pathlib.Path) -> None:
    """Nobody writes to the FIFO: open() without O_NONBLOCK would wait forever."""
    fifo = tmp_path / "c.conf"
    os.mkfifo(fifo)
    try:
        proc = subprocess.run([PYTHON, "-m", "metaproxy", "-t", "-c", str(fifo)], capture_output=True, text=True,
                              timeout=20, cwd=ROOT, env=ENV)
    except subprocess.TimeoutExpired:
        pytest.fail("-t blocked on a FIFO", pytrace=False)
    assert proc.returncode == EX_CONFIG
    assert proc.stderr == f"{fifo}: expected the config as a regular file, found a FIFO\n"


@pytest.mark.parametrize("make, kind", [
    (lambda p: p.mkdir(), "a directory"),
    (lambda p: p.symlink_to("/dev/null"), "a character device"),
], ids=["directory", "device"])
def test_a_directory_or_a_device_is_refused_with_one_line(tmp_path: pathlib.Path, make: object, kind: str) -> None:
    path = tmp_path / "c.conf"
    make(path)  # type: ignore[operator]
    code, out, err = run_cli("-t", "-c", str(path))
    assert (code, out) == (EX_CONFIG, "")
    assert err == f"{path}: expected the config as a regular file, found {kind}\n"


# ---- credentials: a username needs a password for socks5 and http ---------------------

@pytest.mark.parametrize("kind", ["socks5", "http"])
def test_a_username_without_a_password_is_an_error_with_its_line(tmp_path: pathlib.Path, kind: str) -> None:
    """It used to turn authentication (and, for socks5, isolation) off silently."""
    path = write(tmp_path, f"[upstreams]\n    [[up]]\n    type = {kind}\n    address = 127.0.0.1:1080\n"
                           "    username = alice\n[routes]\n* = up\n")
    code, out, err = run_cli("-t", "-c", str(path))
    assert (code, out) == (EX_CONFIG, "")
    assert err.startswith(f"{path}:5: [upstreams][[up]] username: expected a password with it"), err


@pytest.mark.parametrize("body", ["type = socks4\n    username = alice\n",
                                  "type = socks5\n    username = alice\n    password = pw\n",
                                  "type = http\n    username = alice\n    password = pw\n"])
def test_a_socks4_user_id_alone_or_both_credentials_pass(tmp_path: pathlib.Path, body: str) -> None:
    path = write(tmp_path, f"[upstreams]\n    [[up]]\n    {body}    address = 127.0.0.1:1080\n[routes]\n* = up\n")
    assert load(str(path)).upstreams["up"].username == "alice"


# ---- [daemon] log_connections -----------------------------------------------------------

def test_log_connections_is_off_by_default_and_read_from_daemon(tmp_path: pathlib.Path) -> None:
    assert load(str(write(tmp_path, UPSTREAM + ROUTES))).daemon.log_connections is False
    assert load(str(ROOT / "etc/subgraph_metaproxy.conf")).daemon.log_connections is False
    on = write(tmp_path, "[daemon]\nlog_connections = yes\n" + UPSTREAM + ROUTES, "on.conf")
    assert load(str(on)).daemon.log_connections is True
    bad = write(tmp_path, "[daemon]\nlog_connections = sometimes\n" + UPSTREAM + ROUTES, "bad.conf")
    (problem,) = problems(bad)
    assert problem.startswith(f"{bad}:2: [daemon] log_connections: expected yes or no"), problem


@pytest.mark.parametrize("text, name", [("upstreams=\n", "upstreams"), ("routes = 1\n", "routes"),
                                        ("daemon = x\n", "daemon"), ("firewall = y\n", "firewall")])
def test_a_key_where_a_section_belongs_is_a_problem_not_a_traceback(tmp_path: pathlib.Path, text: str,
                                                                    name: str) -> None:
    """Found by the -t fuzz: "upstreams =" reached the upstream loop as a string."""
    assert problems(write(tmp_path, text)) == [
        f"{tmp_path / 'm.conf'}:1: (top) {name}: expected a [{name}] section, found a key '{name}'"]
