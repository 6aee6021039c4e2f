"""Reply codes as text (metaproxy.protocol.replies): the RFC's words and the code, never "error 4"."""

from __future__ import annotations

from metaproxy.protocol.replies import Socks5Reply, describe


def test_reply_texts_include_tor_extended_codes() -> None:
    assert describe("socks5", Socks5Reply.HOST_UNREACHABLE) == "host unreachable (0x04)"
    assert "onion" in describe("socks5", 0xF6) and "(0xf6)" in describe("socks5", 0xF6)
    assert describe("socks5", 0x42) == "unknown reply code (0x42)"
    assert describe("socks4", 0x5B) == "request rejected or failed (0x5b)"
    assert describe("http", 407).startswith("proxy authentication required")


def test_http_statuses_read_as_text_even_unlisted_ones() -> None:
    assert describe("http", 401).startswith("authentication required")
    assert describe("http", 418) == "client error (HTTP 418)"
    assert describe("http", 599) == "proxy error (HTTP 599)"

