"""Where an upstream's reply ends, so that not one byte of payload is eaten.

A reply and the first bytes the destination sends (an SSH or SMTP banner) can
arrive in the same segment. Whatever follows the reply belongs to the client.
"""

from __future__ import annotations

MAX_HTTP_REPLY = 16 * 1024
_ATYP_LENGTH = {0x01: 4, 0x04: 16}  # IPv4, IPv6; 0x03 is a length-prefixed name


class FramingError(ValueError):
    """The reply cannot be framed: unknown address type or oversized headers."""


def socks5_address_length(head: bytes) -> int | None:
    """Length of BND.ADDR + BND.PORT, given bytes that start at ATYP.

    Returns None while more bytes are needed to tell.
    """
    if not head:
        return None
    atyp = head[0]
    if atyp in _ATYP_LENGTH:
        return 1 + _ATYP_LENGTH[atyp] + 2
    if atyp == 0x03:
        if len(head) < 2:
            return None
        return 2 + head[1] + 2
    raise FramingError(f"unknown SOCKS5 address type 0x{atyp:02x} in the reply")


def http_reply_end(buffer: bytes) -> int | None:
    """Index just past the blank line that ends an HTTP reply's headers."""
    end = buffer.find(b"\r\n\r\n")
    if end >= 0:
        if end + 4 > MAX_HTTP_REPLY:
            raise FramingError(f"the HTTP reply headers are larger than {MAX_HTTP_REPLY} bytes")
        return end + 4
    if len(buffer) >= MAX_HTTP_REPLY:
        raise FramingError(f"the HTTP reply headers are larger than {MAX_HTTP_REPLY} bytes")
    return None


def http_status(head: bytes) -> int:
    """The status code of a complete reply head; FramingError if malformed."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise FramingError("the HTTP reply does not start with a valid status line")
    return int(parts[1])
