"""The shared daemon's routing table and the configs the tests write.

Destination port -> upstream: nginx in the web namespace listens on every
port of UPSTREAMS, so a fetch from port P goes through the upstream routed
to P and nothing else.
"""

from __future__ import annotations

from pathlib import Path

from tests.system import peers
from tests.system.daemon import daemon_section
from tests.system.lab import GATEWAY4, GATEWAY6

# ---- the routing table of the shared daemon ---------------------------------------------
# Destination port -> upstream. nginx in the web namespace listens on every port below.
UPSTREAMS = {
    # name: (destination port, upstream section body)
    "dante":           (8001, f"type = socks5\naddress = {GATEWAY4}:{peers.DANTE_PORT}\n"),
    "dante_auth":      (8002, f"type = socks5\naddress = {GATEWAY4}:{peers.DANTE_AUTH_PORT}\n"
                              "isolation = connection\n"),
    "unix_socks":      (8003, "type = socks5\naddress = unix:{unix_socket}\n"),
    "socks4":          (8004, f"type = socks4\naddress = {GATEWAY4}:{peers.DANTE_PORT}\n"),
    "socks4a":         (8005, f"type = socks4a\naddress = {GATEWAY4}:{peers.DANTE_PORT}\n"),
    "http":            (8006, f"type = http\naddress = {GATEWAY4}:{peers.TINYPROXY_AUTH_PORT}\n"
                              f"username = {peers.HTTP_USER}\npassword = {peers.HTTP_PASSWORD}\n"),
    "microsocks":      (8007, f"type = socks5\naddress = {GATEWAY4}:{peers.MICROSOCKS_PORT}\n"
                              "isolation = none\n"),
    "microsocks_auth": (8008, f"type = socks5\naddress = {GATEWAY4}:{peers.MICROSOCKS_AUTH_PORT}\n"
                              f"username = {peers.MICROSOCKS_USER}\npassword = {peers.MICROSOCKS_PASSWORD}\n"),
    "dante_v6":        (8009, f"type = socks5\naddress = [{GATEWAY6}]:{peers.DANTE_PORT}\n"),
    "http_v6":         (8010, f"type = http\naddress = [{GATEWAY6}]:{peers.TINYPROXY_AUTH_PORT}\n"
                              f"username = {peers.HTTP_USER}\npassword = {peers.HTTP_PASSWORD}\n"),
    "squid":           (8011, f"type = http\naddress = {GATEWAY4}:{peers.SQUID_PORT}\n"
                              f"username = {peers.HTTP_USER}\npassword = {peers.HTTP_PASSWORD}\n"),
    # One upstream per isolation mode, all to dante with pam.username.
    "iso_connection":  (8021, f"type = socks5\naddress = {GATEWAY4}:{peers.DANTE_AUTH_PORT}\nisolation = connection\n"),
    "iso_destination": (8022, f"type = socks5\naddress = {GATEWAY4}:{peers.DANTE_AUTH_PORT}\nisolation = destination\n"),
    "iso_user":        (8023, f"type = socks5\naddress = {GATEWAY4}:{peers.DANTE_AUTH_PORT}\nisolation = user\n"),
    "iso_none":        (8024, f"type = socks5\naddress = {GATEWAY4}:{peers.DANTE_AUTH_PORT}\nisolation = none\n"),
    "iso_fixed":       (8026, f"type = socks5\naddress = {GATEWAY4}:{peers.DANTE_AUTH_PORT}\n"
                              "username = fixeduser\npassword = fixedpass\nisolation = connection\n"),
}
# A second destination port for the destination isolation mode.
ISO_DESTINATION_OTHER_PORT = 8025
EXTRA_ROUTES = {ISO_DESTINATION_OTHER_PORT: "iso_destination"}
# Ports that are routed but are not nginx.
SINK_ROUTE = (peers.SINK_PORT, "dante")
SILENT_DEST_ROUTE = (peers.SILENT_PORT, "dante")
DOWN_PORT, SILENT_UPSTREAM_DEST_PORT, UNMATCHED_PORT = 9003, 9004, 9999
HTTP_BAD_AUTH_PORT, SOCKS_BAD_AUTH_PORT = 9005, 9006
EXTRA_UPSTREAMS = {
    "http_bad_auth": f"type = http\naddress = {GATEWAY4}:{peers.TINYPROXY_AUTH_PORT}\n"
                     f"username = {peers.HTTP_USER}\npassword = wrong\n",
    "socks_bad_auth": f"type = socks5\naddress = {GATEWAY4}:{peers.MICROSOCKS_AUTH_PORT}\n"
                      f"username = {peers.MICROSOCKS_USER}\npassword = wrong\n",
    "down": f"type = socks5\naddress = {GATEWAY4}:{peers.DOWN_UPSTREAM_PORT}\n",
    "silent": f"type = socks5\naddress = {GATEWAY4}:{peers.SILENT_UPSTREAM_PORT}\nconnect_timeout = 1\n",
}
# A second set of ports for the log privacy test: they appear in no config
# literally (only inside ranges), so finding one in a log means a leak.
PRIVATE_HTTP_PORT, PRIVATE_DOWN_PORT, PRIVATE_SILENT_PORT, PRIVATE_UNMATCHED_PORT = 47123, 47234, 47345, 47457
HTTP_PORTS = tuple(port for port, _ in UPSTREAMS.values()) + tuple(EXTRA_ROUTES) + (PRIVATE_HTTP_PORT,)

# ---- banner-first destinations ------------------------------------------------------------
# servers.py banner listens on each port below and speaks first; each port is
# routed to one upstream, so the banner crosses exactly that kind of proxy.
# The scripted upstream (scripted_upstream.py) sends its reply and the banner
# in ONE segment, which the real proxies only do by chance.
SCRIPTED_UPSTREAMS = {
    "scripted_socks5":  f"type = socks5\naddress = {GATEWAY4}:{peers.SCRIPTED_UPSTREAM_PORT}\n",
    "scripted_socks4":  f"type = socks4\naddress = {GATEWAY4}:{peers.SCRIPTED_UPSTREAM_PORT}\n",
    "scripted_socks4a": f"type = socks4a\naddress = {GATEWAY4}:{peers.SCRIPTED_UPSTREAM_PORT}\n",
    "scripted_http":    f"type = http\naddress = {GATEWAY4}:{peers.SCRIPTED_UPSTREAM_PORT}\n",
}
BANNER_ROUTES = {
    # upstream name (in UPSTREAMS or SCRIPTED_UPSTREAMS): banner destination port
    "dante": 8101, "microsocks": 8102, "socks4": 8103, "socks4a": 8104, "http": 8105,
    "squid": 8106, "unix_socks": 8107,
    "scripted_socks5": 8111, "scripted_socks4": 8112, "scripted_socks4a": 8113, "scripted_http": 8114,
}
BANNER_PORTS = tuple(BANNER_ROUTES.values())
# squid may CONNECT to these only.
WEB_PORTS = HTTP_PORTS + BANNER_PORTS


def shared_config(port: int, unix_socket: Path) -> str:
    out = [daemon_section(port, connect_timeout=5), "[upstreams]"]
    for name, (_, body) in UPSTREAMS.items():
        out.append(f"    [[{name}]]")
        out += ["    " + line for line in body.format(unix_socket=unix_socket).splitlines()]
    for name, body in {**EXTRA_UPSTREAMS, **SCRIPTED_UPSTREAMS}.items():
        out.append(f"    [[{name}]]")
        out += ["    " + line for line in body.splitlines()]
    out.append("[routes]")
    out += [f"{port} = {name}" for name, (port, _) in UPSTREAMS.items()]
    out += [f"{port} = {name}" for port, name in EXTRA_ROUTES.items()]
    out += [f"{SINK_ROUTE[0]} = {SINK_ROUTE[1]}", f"{SILENT_DEST_ROUTE[0]} = {SILENT_DEST_ROUTE[1]}",
            f"{DOWN_PORT} = down", f"{SILENT_UPSTREAM_DEST_PORT} = silent",
            f"{HTTP_BAD_AUTH_PORT} = http_bad_auth", f"{SOCKS_BAD_AUTH_PORT} = socks_bad_auth"]
    out += [f"{port} = {name}" for name, port in BANNER_ROUTES.items()]
    return "\n".join(out) + "\n"


def privacy_config(port: int, *, debug_key: bool = False) -> str:
    extra = {"connect_timeout": 5}
    if debug_key:
        extra["log_destinations"] = "yes"  # type: ignore[assignment]
    return daemon_section(port, **extra) + f"""\
[upstreams]
    [[dante]]
    type = socks5
    address = {GATEWAY4}:{peers.DANTE_PORT}
    [[down]]
    type = socks5
    address = {GATEWAY4}:{peers.DOWN_UPSTREAM_PORT}
    [[silent]]
    type = socks5
    address = {GATEWAY4}:{peers.SILENT_UPSTREAM_PORT}
    connect_timeout = 1
[routes]
"47100-47199" = dante
"47200-47299" = down
"47300-47399" = silent
"""
