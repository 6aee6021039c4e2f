"""Decoding the kernel's sockaddr_in and sockaddr_in6 (metaproxy.protocol.sockaddr), with bytes alone."""

from __future__ import annotations

import socket
import struct

import pytest

from metaproxy.protocol import sockaddr


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
