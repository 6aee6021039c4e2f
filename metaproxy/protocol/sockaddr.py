"""Decoding of the raw sockaddr that SO_ORIGINAL_DST returns. Pure."""

from __future__ import annotations

import struct

from metaproxy.protocol import address

AF_INET = 2
AF_INET6 = 10
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28


def decode(raw: bytes) -> tuple[str, int]:
    """Return (ip, port) from a struct sockaddr_in or sockaddr_in6.

    The family is in host byte order, the port in network byte order.
    """
    if len(raw) < 4:
        raise ValueError(f"a sockaddr of {len(raw)} bytes is too short")
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == AF_INET and len(raw) >= SOCKADDR_IN_SIZE:
        return address.unpack(raw[4:8]), port
    if family == AF_INET6 and len(raw) >= SOCKADDR_IN6_SIZE:
        packed = raw[8:24]
        # A v4-mapped address means an IPv4 flow seen through a dual-stack socket.
        return address.unpack(packed[12:] if packed[:12] == address.V4_MAPPED else packed), port
    raise ValueError(f"unexpected sockaddr family {family} with {len(raw)} bytes")
