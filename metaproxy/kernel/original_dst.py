"""Recovering where a redirected connection was going.

1. Under REDIRECT, netfilter rewrote the destination to our listener; conntrack
   still holds the original. SO_ORIGINAL_DST (SOL_IP) returns it for IPv4 and
   IP6T_SO_ORIGINAL_DST (SOL_IPV6, same number 80) for IPv6. Which one to ask
   follows the family of the accepted socket: our IPv6 listeners are V6ONLY, so
   an IPv6 socket never carries an IPv4 flow.
2. Under REDIRECT we never fall back to getsockname(): for a redirected socket it
   is our own listener, and relaying there would connect the client back to us.
   If conntrack has no entry, the connection is refused.
3. Under TPROXY nothing was rewritten: the socket's local address *is* the
   original destination, because the listener has IP_TRANSPARENT.
"""

from __future__ import annotations

import socket

from metaproxy.config.model import RedirectMode
from metaproxy.errors import DestinationUnknown
from metaproxy.protocol import sockaddr

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80


def original_destination(sock: socket.socket, mode: RedirectMode) -> tuple[str, int]:
    if mode is RedirectMode.TPROXY:
        name = sock.getsockname()
        return name[0], name[1]
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, sockaddr.SOCKADDR_IN6_SIZE)
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, sockaddr.SOCKADDR_IN_SIZE)
        return sockaddr.decode(raw)
    except (OSError, ValueError) as e:
        raise DestinationUnknown("cannot read the original destination (SO_ORIGINAL_DST): "
                                 f"{getattr(e, 'strerror', None) or e}; was this connection redirected "
                                 "by an iptables/nftables REDIRECT rule?") from e
