"""The original program's JSON config still runs unchanged."""

from __future__ import annotations

import json

from tests.system import clients, peers
from tests.system.daemon import StartDaemon
from tests.system.lab import GATEWAY4, WEB4, WEB6
from tests.system.peers import World
from tests.system.topology import UNMATCHED_PORT, UPSTREAMS

SOCKS_PORT, HTTP_PORT, UNIX_PORT = UPSTREAMS["dante"][0], UPSTREAMS["http"][0], UPSTREAMS["unix_socks"][0]


def legacy_json(unix_socket: str) -> str:
    return json.dumps({"Relays": [
        {"destinationport": str(UNIX_PORT), "relaytype": "SOCKS5",
         "relayip": f"unix:{unix_socket}", "relayport": ""},
        {"destinationport": str(SOCKS_PORT), "relaytype": "SOCKS5",
         "relayip": GATEWAY4, "relayport": str(peers.DANTE_PORT)},
        {"destinationport": str(HTTP_PORT), "relaytype": "HTTP_CONNECT",
         "relayip": GATEWAY4, "relayport": str(peers.TINYPROXY_PORT)},
    ]}, indent=2)


def test_legacy_json_config_relays_socks5_and_http_connect(world: World,
                                                           start_own_daemon: StartDaemon) -> None:
    """A {"Relays": [...]} file with SOCKS5 (TCP and unix:) and HTTP_CONNECT relays works as
    it did: every port is relayed, for IPv4 and IPv6, and other ports are refused.

    The JSON format has no [daemon] section, so the port comes from -p and the
    daemon runs as nobody with --unprivileged (the default service user does not
    exist outside the package)."""
    daemon = start_own_daemon("metaproxy-legacy", lambda port: legacy_json(str(world.gateway.unix_socket)),
                              suffix=".json", args=("-p", "{port}"), unprivileged=True)
    for address in (WEB4, WEB6):
        for port in (SOCKS_PORT, HTTP_PORT, UNIX_PORT):
            got = clients.curl(world.client, clients.url(address, port, "/index.html"))
            assert got.ok, f"{address}:{port}: {got.stderr}\ndaemon:\n{daemon.log()[-2000:]}"
            assert got.body.decode() == peers.INDEX
    refused = clients.exchange(world.client, WEB4, UNMATCHED_PORT, b"GET / HTTP/1.0\r\n\r\n")
    assert refused.reset, refused


def test_legacy_json_logs_deprecation_with_equivalent_configobj_text(world: World,
                                                                     start_own_daemon: StartDaemon) -> None:
    """At start the daemon says, once, that the JSON format is deprecated, and prints
    the configobj text that means the same."""
    daemon = start_own_daemon("metaproxy-legacy", lambda port: legacy_json(str(world.gateway.unix_socket)),
                              suffix=".json", args=("-p", "{port}"), unprivileged=True)
    log = daemon.log()
    assert log.count("deprecated") == 1, log
    assert "[upstreams]" in log and "[routes]" in log, log
    assert f"address = {GATEWAY4}:{peers.DANTE_PORT}" in log, log
    assert f"address = {GATEWAY4}:{peers.TINYPROXY_PORT}" in log, log
    assert f"address = unix:{world.gateway.unix_socket}" in log, log
