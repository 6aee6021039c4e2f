"""Binding the listening sockets: the one thing the daemon needs root for.

 1. Only the addresses the caller names, and only IP literals: AI_NUMERICHOST
    makes getaddrinfo() refuse a name instead of resolving it.
 2. IPv6 sockets set IPV6_V6ONLY, so "::" never takes the IPv4 port too, and
    an IPv4 flow never arrives on an IPv6 socket, where the IPv6 form of
    SO_ORIGINAL_DST would be asked for it.
 3. Under TPROXY the listener accepts connections addressed to foreign IPs:
    IP_TRANSPARENT or IPV6_TRANSPARENT, which need CAP_NET_ADMIN, hence here.
 4. Non-blocking and close-on-exec, ready for the event loop.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from typing import Any

from metaproxy.errors import StartupError
from metaproxy.privileged.steps import describe

IP_TRANSPARENT = 19  # <linux/in.h>
IPV6_TRANSPARENT = 75  # <linux/in6.h>; CPython 3.11 lacks it
BACKLOG = 4096  # bursts of redirected connects queue; the kernel caps it at net.core.somaxconn

REMEDIES = {
    errno.EADDRINUSE: "another process listens there (see `ss -ltnp`): stop it or choose another port",
    errno.EADDRNOTAVAIL: "no interface has this address: add it, or remove it from the listen addresses",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
    errno.EPERM: "IP_TRANSPARENT needs CAP_NET_ADMIN: start the daemon as root, and under systemd add CAP_NET_ADMIN to the unit's CapabilityBoundingSet (see subgraph_metaproxy(8), FIREWALL)",
    errno.EAFNOSUPPORT: "this kernel lacks the address family: remove the address",
}


def _sockaddr(address: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    literal = address.strip().removeprefix("[").removesuffix("]")
    flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV | socket.AI_PASSIVE
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(literal, port, 0, socket.SOCK_STREAM, 0, flags)[0]
    except socket.gaierror as exc:
        raise StartupError(f"listen address {address!r} is not an IPv4 or IPv6 literal "
                           f"({exc.strerror}); names are never resolved") from exc
    return family, sockaddr


def _bind_one(address: str, port: int, transparent: bool) -> socket.socket:
    family, sockaddr = _sockaddr(address, port)
    shown = f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"
    sock = None
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            level, option = ((socket.IPPROTO_IPV6, IPV6_TRANSPARENT) if family == socket.AF_INET6
                             else (socket.IPPROTO_IP, IP_TRANSPARENT))
            sock.setsockopt(level, option, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        return sock
    except OSError as exc:
        if sock is not None:
            sock.close()
        remedy = REMEDIES.get(exc.errno or 0)
        raise StartupError(f"listening on {shown} failed: {describe(exc)}"
                           + (f"; {remedy}" if remedy else "")) from exc


def bind_listeners(addresses: Sequence[str], port: int, *, transparent: bool) -> list[socket.socket]:
    """Bind and listen on each address at `port`: all of them, or none (StartupError)."""
    if isinstance(addresses, str) or not addresses:
        raise StartupError(f"no listen addresses given (got {addresses!r}): nothing to bind")
    if not 0 < port < 65536:
        raise StartupError(f"listen port {port} is outside 1-65535")
    bound: list[socket.socket] = []
    try:
        for address in addresses:
            bound.append(_bind_one(address, port, transparent))
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound
