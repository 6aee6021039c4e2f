"""The HTTP CONNECT client state machine, with bytes alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.protocol.handshake import MAX_REPLY, NEED_MORE, Done, Refused, Violation
from metaproxy.protocol.http_connect import HttpConnect


def test_request_is_authority_form_without_a_user_agent() -> None:
    assert HttpConnect("198.51.100.2", 443).first() == (
        b"CONNECT 198.51.100.2:443 HTTP/1.1\r\nHost: 198.51.100.2:443\r\n\r\n")


def test_ipv6_authority_is_bracketed_in_the_request_line_and_host() -> None:
    assert HttpConnect("2001:db8:2::2", 443).first() == (
        b"CONNECT [2001:db8:2::2]:443 HTTP/1.1\r\nHost: [2001:db8:2::2]:443\r\n\r\n")


def test_basic_auth_only_with_credentials() -> None:
    request = HttpConnect("198.51.100.2", 443, ("alice", "s3cret")).first()
    assert b"Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n" in request
    assert b"Proxy-Authorization" not in HttpConnect("198.51.100.2", 443).first()


def test_payload_after_the_headers_is_handed_back() -> None:
    m = HttpConnect("198.51.100.2", 22)
    m.first()
    reply = b"HTTP/1.1 200 Connection established\r\nVia: squid\r\n\r\nSSH-2.0-x\r\n"
    assert m.receive(reply) == Done(b"SSH-2.0-x\r\n")
    assert m.want == 0


def test_a_reply_in_pieces_and_the_end_split_across_them() -> None:
    m = HttpConnect("198.51.100.2", 22)
    reply = b"HTTP/1.0 200 OK\r\n\r"
    assert m.receive(reply) is NEED_MORE
    assert m.receive(b"\n") == Done(b"")


@pytest.mark.parametrize("status", [200, 201, 299])
def test_any_2xx_opens_the_tunnel(status: int) -> None:
    assert HttpConnect("198.51.100.2", 22).receive(f"HTTP/1.1 {status} x\r\n\r\n".encode()) == Done(b"")


@pytest.mark.parametrize("status, text", [(407, "proxy authentication required"), (403, "forbidden"),
                                          (502, "bad gateway"), (302, "unexpected status (HTTP 302)"),
                                          (599, "proxy error (HTTP 599)")])
def test_other_statuses_are_refusals_named_by_code(status: int, text: str) -> None:
    with pytest.raises(Refused) as caught:
        HttpConnect("198.51.100.2", 22).receive(f"HTTP/1.1 {status} Reason\r\n\r\n".encode())
    assert caught.value.code == status and text in caught.value.reason


@pytest.mark.parametrize("reply", [b"SSH-2.0-not-http\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n",
                                   b"HTTP/2 200\r\n\r\n", b"\r\n\r\n", b"HTTP/1.1 200"[:5] + b"\xff\xfe 200\r\n\r\n"])
def test_malformed_status_lines_are_violations(reply: bytes) -> None:
    with pytest.raises(Violation):
        HttpConnect("198.51.100.2", 22).receive(reply)


def test_not_http_is_noticed_without_waiting_for_the_end_of_headers() -> None:
    with pytest.raises(Violation, match="valid status line"):
        HttpConnect("198.51.100.2", 22).receive(b"SSH-2.0-OpenSSH")


def test_headers_are_bounded() -> None:
    m = HttpConnect("198.51.100.2", 22)
    assert m.want == MAX_REPLY
    with pytest.raises(Violation, match="larger than"):
        m.receive(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000)


def test_reason_phrase_never_reaches_the_error_text() -> None:
    with pytest.raises(Refused) as caught:
        HttpConnect("198.51.100.2", 22).receive(b"HTTP/1.1 502 cannot reach 198.51.100.2:22\r\n\r\n")
    assert "198.51.100.2" not in str(caught.value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=8))
def test_any_bytes_end_in_a_step_a_refusal_or_a_violation(chunks: list[bytes]) -> None:
    m = HttpConnect("198.51.100.2", 22)
    for chunk in chunks:
        try:
            step = m.receive(chunk[:m.want])
        except (Refused, Violation):
            return
        if isinstance(step, Done):
            return
        assert step is NEED_MORE
