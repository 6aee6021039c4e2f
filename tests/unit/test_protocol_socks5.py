"""The SOCKS5 client state machine, with bytes alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.protocol.handshake import NEED_MORE, Done, Refused, Send, Violation
from metaproxy.protocol.socks5 import Socks5

OK_V4 = b"\x05\x00\x00\x01" + bytes([192, 0, 2, 2]) + b"\x04\x38"
REQUEST_V4 = b"\x05\x01\x00\x01" + bytes([198, 51, 100, 2]) + b"\x00\x50"


def opened(credentials: tuple[str, str] | None = None) -> Socks5:
    return Socks5("198.51.100.2", 80, credentials)


def test_without_credentials_offers_no_auth_only_then_sends_the_request() -> None:
    m = opened()
    assert m.first() == b"\x05\x01\x00"
    assert m.want == 2
    assert m.receive(b"\x05\x00") == Send(REQUEST_V4)
    assert m.want == 5
    assert m.receive(OK_V4) == Done(b"")
    assert m.want == 0


def test_with_credentials_offers_both_methods_and_authenticates_when_chosen() -> None:
    m = opened(("alice", "pw"))
    assert m.first() == b"\x05\x02\x00\x02"
    assert m.receive(b"\x05\x02") == Send(b"\x01\x05alice\x02pw")
    assert m.receive(b"\x01\x00") == Send(REQUEST_V4)
    assert m.receive(OK_V4) == Done(b"")


def test_credentials_are_skipped_when_the_server_picks_no_auth() -> None:
    m = opened(("alice", "pw"))
    m.first()
    assert m.receive(b"\x05\x00") == Send(REQUEST_V4)


def test_utf8_credentials_are_sent_as_utf8_bytes() -> None:
    m = opened(("zoë", "pässword"))
    m.first()
    assert m.receive(b"\x05\x02") == Send(b"\x01\x04zo\xc3\xab\x09p\xc3\xa4ssword")


def test_ipv6_destination_uses_atyp_4() -> None:
    m = Socks5("2001:db8:2::2", 443)
    m.first()
    step = m.receive(b"\x05\x00")
    assert isinstance(step, Send)
    assert step.data[:4] == b"\x05\x01\x00\x04" and len(step.data) == 22 and step.data[-2:] == b"\x01\xbb"


@pytest.mark.parametrize("bound, total", [
    (b"\x01" + bytes(4), 10), (b"\x04" + bytes(16), 22), (b"\x03\x05abcde", 12), (b"\x03\x00", 7),
])
def test_the_reply_is_read_exactly_whatever_the_address_type(bound: bytes, total: int) -> None:
    m = opened()
    m.first()
    m.receive(b"\x05\x00")
    reply = b"\x05\x00\x00" + bound + b"\x00\x50"
    assert len(reply) == total
    assert m.want == 5
    assert m.receive(reply[:5]) is NEED_MORE
    assert m.want == total - 5
    assert m.receive(reply[5:]) == Done(b"")


def test_a_name_in_the_reply_that_is_not_utf8_is_never_decoded() -> None:
    m = opened()
    m.first()
    m.receive(b"\x05\x00")
    assert m.receive(b"\x05\x00\x00\x03\x04\xff\xfe\x80\x00\x00\x50") == Done(b"")


def test_payload_after_the_reply_is_handed_back() -> None:
    m = opened()
    m.first()
    m.receive(b"\x05\x00")
    assert m.receive(OK_V4 + b"SSH-2.0-x\r\n") == Done(b"SSH-2.0-x\r\n")


def test_byte_by_byte_reply() -> None:
    m = opened()
    m.first()
    m.receive(b"\x05\x00")
    steps = [m.receive(bytes([b])) for b in OK_V4]
    assert steps[:-1] == [NEED_MORE] * (len(OK_V4) - 1) and steps[-1] == Done(b"")


@pytest.mark.parametrize("code, text", [
    (0x04, "host unreachable (0x04)"), (0x02, "connection not allowed by ruleset (0x02)"),
    (0xF0, "onion service descriptor not found (Tor) (0xf0)"), (0xF6, "invalid onion address (Tor) (0xf6)"),
    (0xF7, "onion service introduction timed out (Tor) (0xf7)"), (0x42, "unknown reply code (0x42)"),
])
def test_refusals_carry_their_code_and_name(code: int, text: str) -> None:
    m = opened()
    m.first()
    m.receive(b"\x05\x00")
    with pytest.raises(Refused) as caught:
        m.receive(bytes([5, code]))  # the rest of a failed reply often never comes
    assert caught.value.code == code and caught.value.reason == text


def test_rejected_credentials_are_a_refusal() -> None:
    m = opened(("alice", "wrong"))
    m.first()
    m.receive(b"\x05\x02")
    with pytest.raises(Refused, match="check username and password"):
        m.receive(b"\x01\x01")


def test_no_acceptable_method_is_a_refusal() -> None:
    m = opened()
    m.first()
    with pytest.raises(Refused, match="none of the offered authentication methods"):
        m.receive(b"\x05\xff")


@pytest.mark.parametrize("greeting", [b"\x04\x00", b"\x05\x02", b"\x05\x01", b"HT"])
def test_bad_method_replies_are_violations(greeting: bytes) -> None:
    m = opened()
    m.first()
    with pytest.raises(Violation):
        m.receive(greeting)


def test_unknown_address_type_is_a_violation() -> None:
    m = opened()
    m.first()
    m.receive(b"\x05\x00")
    with pytest.raises(Violation, match="address type 0x09"):
        m.receive(b"\x05\x00\x00\x09\x00")


def test_bytes_before_our_next_message_are_a_violation() -> None:
    m = opened()
    m.first()
    with pytest.raises(Violation):
        m.receive(b"\x05\x00" + OK_V4)


def test_overlong_credentials_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="256 bytes"):
        Socks5("198.51.100.2", 80, ("u" * 256, "p"))


def test_violation_texts_never_quote_the_destination() -> None:
    m = Socks5("203.0.113.77", 4321)
    m.first()
    m.receive(b"\x05\x00")
    with pytest.raises(Violation) as caught:
        m.receive(b"\x05\x00\x00\x09\x00")
    assert "203.0.113.77" not in str(caught.value) and "4321" not in str(caught.value)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8), st.booleans())
def test_any_bytes_end_in_a_step_a_refusal_or_a_violation(chunks: list[bytes], auth: bool) -> None:
    m = opened(("u", "p") if auth else None)
    m.first()
    for chunk in chunks:
        if not chunk or m.want == 0:
            continue
        try:
            step = m.receive(chunk[:m.want])
        except (Refused, Violation):
            return
        assert step is NEED_MORE or isinstance(step, (Send, Done))
        if isinstance(step, Done):
            return
