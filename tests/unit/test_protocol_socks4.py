"""The SOCKS4/4a client state machine, with bytes alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.protocol.handshake import NEED_MORE, Done, Refused, Violation
from metaproxy.protocol.socks4 import Socks4

GRANTED = b"\x00\x5a" + bytes(6)


def test_request_carries_port_address_and_user_id() -> None:
    assert Socks4("198.51.100.2", 80, "alice").first() == b"\x04\x01\x00\x50\xc6\x33\x64\x02alice\x00"
    assert Socks4("198.51.100.2", 80).first() == b"\x04\x01\x00\x50\xc6\x33\x64\x02\x00"


def test_the_reply_is_eight_bytes_and_what_follows_is_payload() -> None:
    m = Socks4("198.51.100.2", 22)
    assert m.want == 8
    assert m.receive(GRANTED[:3]) is NEED_MORE
    assert m.want == 5
    assert m.receive(GRANTED[3:] + b"SSH-2.0-x\r\n") == Done(b"SSH-2.0-x\r\n")
    assert m.want == 0


def test_a_version_4_reply_is_accepted() -> None:
    assert Socks4("198.51.100.2", 22).receive(b"\x04\x5a" + bytes(6)) == Done(b"")


@pytest.mark.parametrize("code, text", [(0x5B, "request rejected or failed (0x5b)"),
                                        (0x5C, "identd"), (0x00, "unknown reply code (0x00)")])
def test_refusals_are_named(code: int, text: str) -> None:
    with pytest.raises(Refused, match=text.replace("(", r"\(").replace(")", r"\)")) as caught:
        Socks4("198.51.100.2", 22).receive(bytes([0, code]) + bytes(6))
    assert caught.value.code == code


def test_wrong_version_is_a_violation() -> None:
    with pytest.raises(Violation, match="0x05"):
        Socks4("198.51.100.2", 22).receive(b"\x05\x00" + bytes(6))


def test_ipv6_and_bad_user_ids_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="IPv6"):
        Socks4("2001:db8:2::2", 80)
    with pytest.raises(ValueError, match="NUL"):
        Socks4("198.51.100.2", 80, "a\0b")
    with pytest.raises(ValueError, match="256 bytes"):
        Socks4("198.51.100.2", 80, "u" * 256)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=12), max_size=6))
def test_any_bytes_end_in_a_step_a_refusal_or_a_violation(chunks: list[bytes]) -> None:
    m = Socks4("198.51.100.2", 22)
    for chunk in chunks:
        try:
            step = m.receive(chunk[:m.want])
        except (Refused, Violation):
            return
        if isinstance(step, Done):
            return
        assert step is NEED_MORE
