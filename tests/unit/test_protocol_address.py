"""protocol.address: the per-connection address conversions, against the ipaddress module."""

from __future__ import annotations

import ipaddress
import random

import pytest

from metaproxy.protocol import address

TEXTS = [
    "0.0.0.0", "127.0.0.1", "255.255.255.255", "192.0.2.1", "198.51.100.10", "10.0.0.255",
    "256.0.0.1", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.04", "1.2.3.00", "1.2.3.-4", "1.2.3.+4",
    " 1.2.3.4", "1.2.3.4 ", "1.2.3.4\n", "1..3.4", "", ".", "a.b.c.d", "1.2.3.٤", "1.2.3.²", "1.2.3.0x4",
    "1000.2.3.4", "1.2.3.4%eth0", "::", "::1", "2001:db8::2:2", "::ffff:192.0.2.1", "::ffff:c000:201",
    "fe80::1%eth0", "::ffff:1.2.3", "2001:db8::g", ":::", "1:2:3:4:5:6:7:8:9",
]


def _reference_pack(text: str) -> bytes | None:
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        return None


def _pack(text: str) -> bytes | None:
    try:
        return address.pack(text)
    except ValueError:
        return None


@pytest.mark.parametrize("text", TEXTS)
def test_pack_accepts_and_refuses_what_ipaddress_does(text: str) -> None:
    assert _pack(text) == _reference_pack(text)


def test_random_addresses_pack_and_unpack_as_ipaddress_does() -> None:
    rng = random.Random(10)
    for _ in range(3000):
        v4 = ".".join(str(rng.choice([0, 1, 9, 10, 99, 100, 199, 249, 250, 255, 256, rng.randrange(300)]))
                      for _ in range(rng.choice([3, 4, 4, 4, 5])))
        assert _pack(v4) == _reference_pack(v4), v4
        for packed in (rng.randbytes(4), rng.randbytes(16), address.V4_MAPPED + rng.randbytes(4)):
            text = address.unpack(packed)
            assert text == str(ipaddress.ip_address(packed)), packed
            assert address.pack(text) == packed


def _reference_canonical(text: str) -> str | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@pytest.mark.parametrize("text", TEXTS)
def test_canonical_is_what_ipaddress_prints_unscoped_and_v4_mapped_as_ipv4(text: str) -> None:
    try:
        ours: str | None = address.canonical(text)
    except ValueError:
        ours = None
    assert ours == _reference_canonical(text)


@pytest.mark.parametrize("text", ["198.51.100.300", "2001:db8::zz", "2001:db8::1:2:3:4:5:6:7"])
def test_errors_never_repeat_the_text_which_may_be_a_destination(text: str) -> None:
    with pytest.raises(ValueError) as raised:
        address.pack(text)
    assert text not in str(raised.value) and "198.51.100" not in str(raised.value)
    assert "2001:db8" not in str(raised.value)
