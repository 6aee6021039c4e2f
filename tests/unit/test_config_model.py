"""The typed configuration (metaproxy.config.model): route lookup, and what -t prints from it."""

from __future__ import annotations

import pathlib

import pytest

from metaproxy.config.model import (
    Config, DaemonSettings, InetAddress, PortRange, RouteTable, UnixAddress, Upstream, UpstreamType,
)
from tests.unit.config_fixtures import ROUTES, UPSTREAM, run_cli, write

ROUTE_TABLE = RouteTable(ports={80: "web", 8080: "tor"}, ranges=(PortRange(8000, 8100, "range"),), fallback="tor")
UPSTREAMS = {
    "tor": Upstream(name="tor", type=UpstreamType.SOCKS5, address=UnixAddress("/run/tor/socks")),
    "web": Upstream(name="web", type=UpstreamType.HTTP, address=InetAddress("192.0.2.2", 3128)),
    "range": Upstream(name="range", type=UpstreamType.SOCKS4, address=InetAddress("2001:db8::1", 1080)),
}


@pytest.mark.parametrize("port, name", [
    (80, "web"),                       # a single port
    (8080, "tor"),                     # a single port inside a range beats the range
    (8000, "range"), (8100, "range"),  # both ends of a range are in it
    (7999, "tor"), (8101, "tor"),      # just outside: the fallback
])
def test_a_single_port_beats_a_range_which_beats_the_fallback(port: int, name: str) -> None:
    assert ROUTE_TABLE.lookup(port) == name


def test_without_a_fallback_an_unrouted_port_has_no_upstream() -> None:
    table = RouteTable(ports={443: "tor"})
    assert table.lookup(443) == "tor" and table.lookup(80) is None
    assert table.names() == {"tor"} and RouteTable().names() == set()
    assert ROUTE_TABLE.names() == {"web", "tor", "range"}


def test_the_relay_table_lists_ports_then_ranges_then_the_fallback() -> None:
    config = Config(source="m.conf", daemon=DaemonSettings(), upstreams=UPSTREAMS, routes=ROUTE_TABLE)
    table = config.relay_table()
    assert [line.split(" -> ")[0].strip() for line in table] == ["80", "8080", "8000-8100", "*"]
    assert table[0].endswith("-> web (http 192.0.2.2:3128 timeout=10s)"), table
    assert "range (socks4 [2001:db8::1]:1080 timeout=10s)" in table[2], table
    assert table[3].endswith("-> tor (socks5 unix:/run/tor/socks isolation=destination,user every 600s "
                             "timeout=10s)"), table
    assert config.warnings() == []


def test_no_fallback_is_shown_as_refused_and_no_routes_at_all_is_a_warning() -> None:
    routed = Config(source="m.conf", daemon=DaemonSettings(), upstreams=UPSTREAMS,
                    routes=RouteTable(ports={80: "web"}))
    assert routed.relay_table()[-1] == f"{'*':>11} -> refused (no fallback route)"
    empty = Config(source="m.conf", daemon=DaemonSettings(), upstreams=UPSTREAMS, routes=RouteTable())
    assert empty.warnings() == ["m.conf: warning: [routes] is empty: every connection will be refused"]


def test_each_daemon_key_is_either_reloadable_or_restart_only() -> None:
    reloadable, restart = set(DaemonSettings.reloadable()), set(DaemonSettings.restart_only())
    assert not reloadable & restart
    assert {"listen", "port", "mode", "user", "groups", "seccomp"} <= restart
    assert {"max_connections", "idle_timeout", "connect_timeout"} <= reloadable


# ---- what -t prints from the model -------------------------------------------------------

@pytest.mark.parametrize("text", ["", "# nothing\n", UPSTREAM, UPSTREAM + "[routes]\n"])
def test_a_config_with_no_routes_passes_with_a_warning(tmp_path: pathlib.Path, text: str) -> None:
    path = write(tmp_path, text)
    code, out, err = run_cli("-t", "-c", str(path))
    assert code == 0 and out.startswith(f"{path}: configuration OK"), err
    assert err == f"{path}: warning: [routes] is empty: every connection will be refused\n"


def test_a_config_with_routes_has_no_warning(tmp_path: pathlib.Path) -> None:
    code, _, err = run_cli("-t", "-c", str(write(tmp_path, UPSTREAM + ROUTES)))
    assert (code, err) == (0, "")

