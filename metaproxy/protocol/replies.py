"""Upstream reply codes as IntEnums, with one table from code to text.

Errors are built from these tables ("refused CONNECT: host unreachable (0x04)"),
never "error 4".
"""

from __future__ import annotations

import enum


class Socks5Reply(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08
    # Tor's extended errors (tor's socks-extensions.txt, ExtendedErrors).
    TOR_ONION_DESC_NOT_FOUND = 0xF0
    TOR_ONION_DESC_INVALID = 0xF1
    TOR_ONION_INTRO_FAILED = 0xF2
    TOR_ONION_REND_FAILED = 0xF3
    TOR_ONION_MISSING_CLIENT_AUTH = 0xF4
    TOR_ONION_WRONG_CLIENT_AUTH = 0xF5
    TOR_ONION_BAD_ADDRESS = 0xF6
    TOR_ONION_INTRO_TIMEOUT = 0xF7


SOCKS5_TEXT: dict[int, str] = {
    Socks5Reply.SUCCEEDED: "succeeded",
    Socks5Reply.GENERAL_FAILURE: "general SOCKS server failure",
    Socks5Reply.NOT_ALLOWED: "connection not allowed by ruleset",
    Socks5Reply.NETWORK_UNREACHABLE: "network unreachable",
    Socks5Reply.HOST_UNREACHABLE: "host unreachable",
    Socks5Reply.CONNECTION_REFUSED: "connection refused",
    Socks5Reply.TTL_EXPIRED: "TTL expired",
    Socks5Reply.COMMAND_NOT_SUPPORTED: "command not supported",
    Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
    Socks5Reply.TOR_ONION_DESC_NOT_FOUND: "onion service descriptor not found (Tor)",
    Socks5Reply.TOR_ONION_DESC_INVALID: "onion service descriptor invalid (Tor)",
    Socks5Reply.TOR_ONION_INTRO_FAILED: "onion service introduction failed (Tor)",
    Socks5Reply.TOR_ONION_REND_FAILED: "onion service rendezvous failed (Tor)",
    Socks5Reply.TOR_ONION_MISSING_CLIENT_AUTH: "onion service requires client authorization (Tor)",
    Socks5Reply.TOR_ONION_WRONG_CLIENT_AUTH: "onion service client authorization was wrong (Tor)",
    Socks5Reply.TOR_ONION_BAD_ADDRESS: "invalid onion address (Tor)",
    Socks5Reply.TOR_ONION_INTRO_TIMEOUT: "onion service introduction timed out (Tor)",
}


class Socks4Reply(enum.IntEnum):
    GRANTED = 0x5A
    REJECTED = 0x5B
    NO_IDENTD = 0x5C
    IDENTD_MISMATCH = 0x5D


SOCKS4_TEXT: dict[int, str] = {
    Socks4Reply.GRANTED: "request granted",
    Socks4Reply.REJECTED: "request rejected or failed",
    Socks4Reply.NO_IDENTD: "rejected: the server cannot reach the client's identd",
    Socks4Reply.IDENTD_MISMATCH: "rejected: identd reported a different user id",
}

HTTP_TEXT: dict[int, str] = {
    400: "bad request",
    401: "authentication required (check username and password)",
    403: "forbidden by the proxy's policy",
    404: "not found",
    405: "CONNECT not allowed",
    407: "proxy authentication required (check username and password)",
    500: "proxy internal error",
    502: "bad gateway (the proxy could not reach the destination)",
    501: "CONNECT not implemented by the proxy",
    503: "service unavailable",
    504: "gateway timeout (the proxy timed out reaching the destination)",
}


def describe(kind: str, code: int) -> str:
    """``kind`` is 'socks5', 'socks4' or 'http'. Unknown codes still read well."""
    if kind == "http":
        fallback = {4: "client error", 5: "proxy error"}.get(code // 100, "unexpected status")
        return f"{HTTP_TEXT.get(code, fallback)} (HTTP {code})"
    table = SOCKS5_TEXT if kind == "socks5" else SOCKS4_TEXT
    return f"{table.get(code, 'unknown reply code')} (0x{code:02x})"
