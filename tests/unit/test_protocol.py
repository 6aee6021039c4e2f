"""Pure protocol logic: sockaddr decoding, reply texts, isolation."""

from __future__ import annotations

import socket
import struct

import pytest

from metaproxy.config.model import Isolation
from metaproxy.protocol import sockaddr
from metaproxy.protocol.isolation import TOR_RESERVED_PREFIX, Isolator
from metaproxy.protocol.replies import Socks5Reply, describe


def test_sockaddr_in_and_in6_decode() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 443) + socket.inet_aton("198.51.100.2") + bytes(8)
    assert sockaddr.decode(v4) == ("198.51.100.2", 443)
    v6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 80) + bytes(4)
          + socket.inet_pton(socket.AF_INET6, "2001:db8:2::2") + bytes(4))
    assert sockaddr.decode(v6) == ("2001:db8:2::2", 80)
    mapped = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 80) + bytes(4)
              + socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.9") + bytes(4))
    assert sockaddr.decode(mapped) == ("192.0.2.9", 80)


@pytest.mark.parametrize("raw", [b"", b"\x02\x00", struct.pack("=H", 99) + bytes(26)])
def test_sockaddr_garbage_is_an_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        sockaddr.decode(raw)


def test_reply_texts_include_tor_extended_codes() -> None:
    assert describe("socks5", Socks5Reply.HOST_UNREACHABLE) == "host unreachable (0x04)"
    assert "onion" in describe("socks5", 0xF6) and "(0xf6)" in describe("socks5", 0xF6)
    assert describe("socks5", 0x42) == "unknown reply code (0x42)"
    assert describe("socks4", 0x5B) == "request rejected or failed (0x5b)"
    assert describe("http", 407).startswith("proxy authentication required")


def test_isolation_connection_makes_fresh_credentials_every_time() -> None:
    iso = Isolator(Isolation.CONNECTION)
    a, b = iso.credentials("198.51.100.2", 80, 1000), iso.credentials("198.51.100.2", 80, 1000)
    assert a is not None and b is not None and a != b


def test_isolation_destination_shares_per_destination_only() -> None:
    iso = Isolator(Isolation.DESTINATION, secret=b"k" * 32)
    assert iso.credentials("198.51.100.2", 80, 1) == iso.credentials("198.51.100.2", 80, 2)
    assert iso.credentials("198.51.100.2", 80, 1) != iso.credentials("198.51.100.2", 443, 1)
    creds = iso.credentials("198.51.100.2", 80, 1)
    assert creds is not None and "198.51.100.2" not in creds[0] + creds[1]


def test_isolation_user_shares_per_uid_and_isolates_unknown_uids() -> None:
    iso = Isolator(Isolation.USER, secret=b"k" * 32)
    assert iso.credentials("198.51.100.2", 80, 1000) == iso.credentials("203.0.113.9", 22, 1000)
    assert iso.credentials("198.51.100.2", 80, 1000) != iso.credentials("198.51.100.2", 80, 1001)
    assert iso.credentials("198.51.100.2", 80, None) != iso.credentials("198.51.100.2", 80, None)


def test_isolation_none_sends_no_credentials_and_names_avoid_tor_prefix() -> None:
    assert Isolator(Isolation.NONE).credentials("198.51.100.2", 80, 0) is None
    for mode in (Isolation.CONNECTION, Isolation.DESTINATION, Isolation.USER):
        creds = Isolator(mode).credentials("198.51.100.2", 80, 0)
        assert creds is not None and not creds[0].startswith(TOR_RESERVED_PREFIX)
        assert len(creds[0]) <= 255 and len(creds[1]) <= 255


def test_http_statuses_read_as_text_even_unlisted_ones() -> None:
    assert describe("http", 401).startswith("authentication required")
    assert describe("http", 418) == "client error (HTTP 418)"
    assert describe("http", 599) == "proxy error (HTTP 599)"
