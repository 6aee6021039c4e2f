"""IP address text to bytes and back, on the per-connection path. Pure.

Each connection turns its destination into bytes (the SOCKS request, the
owner lookup) and bytes into text (SO_ORIGINAL_DST, inet_diag's replies). An
ipaddress object per call was about a tenth of the daemon's Python time for
a connection, so IPv4, the usual case, is done here with one strict pattern;
IPv6 still goes through ipaddress. Both accept and refuse exactly what
``ipaddress.ip_address`` does (tests/unit/test_protocol_address.py).
"""

from __future__ import annotations

import ipaddress
import re

# Four decimal parts from 0 to 255, no leading zeros, ASCII digits only: the
# spelling ipaddress accepts, and the one it prints.
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")
# ::ffff:a.b.c.d, an IPv4 flow seen through a dual-stack (AF_INET6) socket.
V4_MAPPED = bytes(10) + b"\xff\xff"


def pack(text: str) -> bytes:
    """The 4 or 16 address bytes of ``text``; ValueError if it is not an IP address.

    An IPv6 scope (``%eth0``) is dropped, as ipaddress drops it from ``packed``.
    The error never repeats the text: it may be a destination, and errors reach
    the log without the debug flag."""
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text).packed
        except ValueError:
            raise ValueError("not an IPv6 address") from None
    if _IPV4.fullmatch(text) is None:
        raise ValueError("not an IPv4 or IPv6 address")
    return bytes(map(int, text.split(".")))


def unpack(packed: bytes) -> str:
    """The text of 4 or 16 address bytes, as ipaddress prints it."""
    if len(packed) == 4:
        return ".".join(map(str, packed))
    return str(ipaddress.IPv6Address(packed))


def canonical(text: str) -> str:
    """The one spelling of an address, for comparisons and keys: no scope, and a
    v4-mapped address as IPv4. ValueError if ``text`` is not an IP address."""
    text = text.split("%", 1)[0]
    if _IPV4.fullmatch(text) is not None:
        return text  # the pattern admits only the spelling unpack() gives
    packed = pack(text)
    return unpack(packed[12:] if packed[:12] == V4_MAPPED else packed)
