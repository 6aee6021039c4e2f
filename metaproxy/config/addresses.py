"""Parsing of the address and name forms the config accepts. Pure functions.

Only IP literals are accepted, never host names: the daemon must never resolve
a name, because a lookup outside the proxy would leak.
"""

from __future__ import annotations

import ipaddress
import re

from metaproxy.config.model import InetAddress, UnixAddress


def parse_inet(text: str) -> InetAddress:
    """``1.2.3.4:80`` or ``[2001:db8::1]:80``. Raises ValueError with the reason."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("an IPv6 address needs the form [address]:port")
        _ip(host, 6)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError("the port is missing")
        if ":" in host:
            raise ValueError("an IPv6 address must be written in brackets, [address]:port")
        _ip(host, 4)
    return InetAddress(host=str(ipaddress.ip_address(host)), port=parse_port(port))


def parse_upstream_address(text: str) -> InetAddress | UnixAddress:
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError("a unix: address needs an absolute path")
        return UnixAddress(path)
    return parse_inet(text)


def parse_port(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"the port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"the port {port} is out of range 1-65535")
    return port


# Debian's NAME_REGEX for system users, a little wider (upper case, '.'), or a
# numeric uid: the same rule as metaproxy/firewall/plan.py, which pastes the
# names into rule text (tests/unit/test_config_addresses.py keeps the two in step).
# Bounded, one way to match: it cannot backtrack far.
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")


USER_NAME_RULE = "a user name (letters, digits, '_', '.', '-', at most 32 of them) or a numeric uid"


def is_user_name(text: str) -> bool:
    return _USER_NAME.fullmatch(text) is not None


def parse_listen_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address (host names are not accepted)") from None


def _ip(host: str, version: int) -> None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (host names are not accepted)") from None
    if ip.version != version:
        raise ValueError(f"{host!r} is not an IPv{version} address")


# An interface name as iptables (-i) and nftables (iifname) take it, at most
# IFNAMSIZ - 1 = 15 characters, or a prefix of one ending in '*' (iptables
# spells it '+'). Nothing that either tool reads as syntax may pass: no
# quote, space, '!', '+' or '/'. A bare '*' (every interface) is refused:
# it would divert the uplink too.
_INTERFACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}\*?")

INTERFACE_RULE = "an interface name (letters, digits, '_', '.', '-', at most 15), or a prefix ending in '*'"


def is_interface(text: str) -> bool:
    return _INTERFACE.fullmatch(text) is not None and text not in ("lo", "lo*")
