"""The client side of an HTTP CONNECT (RFC 9110 9.3.6), optionally with Basic auth.

1. The request target is authority-form: ``host:port``, with brackets around
   an IPv6 literal (``[2001:db8::1]:443``), and a Host header to match.
2. It carries no User-Agent: a library's name and version on every CONNECT is
   a fingerprint of the daemon, and the proxy needs none.
3. Proxy-Authorization goes only with a configured username; isolation
   credentials are for SOCKS5 (Tor) alone.
4. The reply ends at the first empty line. Its headers are bounded; anything
   after them is the destination's first bytes (an SSH or SMTP banner) and
   is handed on as payload. Any 2xx opens the tunnel (RFC 9110); anything
   else is refused with its status code. The reason phrase and headers are
   never read into a message.
"""

from __future__ import annotations

import base64

from metaproxy.protocol.handshake import MAX_REPLY, NEED_MORE, Done, Refused, Step, Violation
from metaproxy.protocol.replies import describe

_END = b"\r\n\r\n"


def authority(dest_ip: str, dest_port: int) -> str:
    return f"[{dest_ip}]:{dest_port}" if ":" in dest_ip else f"{dest_ip}:{dest_port}"


def connect_request(dest_ip: str, dest_port: int, credentials: tuple[str, str] | None = None) -> bytes:
    target = authority(dest_ip, dest_port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if credentials:
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_code(head: bytes) -> int:
    """The status of a complete reply head; Violation if its first line is not a status line."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(None, 2)
    if (len(parts) < 2 or parts[0] not in (b"HTTP/1.0", b"HTTP/1.1")
            or len(parts[1]) != 3 or not parts[1].isdigit()):
        raise Violation("the HTTP reply does not start with a valid status line (is this an HTTP proxy?)")
    return int(parts[1])


class HttpConnect:
    __slots__ = ("_request", "_buf", "_done")

    def __init__(self, dest_ip: str, dest_port: int, credentials: tuple[str, str] | None = None) -> None:
        self._request = connect_request(dest_ip, dest_port, credentials)
        self._buf = b""
        self._done = False

    @property
    def want(self) -> int:
        # Where the headers end is only known once read, so this may take
        # payload too; receive() hands it back. The bound stops a flood.
        return 0 if self._done else MAX_REPLY - len(self._buf)

    def first(self) -> bytes:
        return self._request

    def receive(self, data: bytes) -> Step:
        if self._done:
            raise Violation("the HTTP CONNECT handshake is already over")
        # Search only where the end could be: a reply that trickles in a byte
        # at a time must not cost quadratic time.
        start = max(0, len(self._buf) - 3)
        buf = self._buf + data
        end = buf.find(_END, start)
        if end < 0:
            if len(buf) >= MAX_REPLY:
                raise Violation(f"the HTTP reply headers are larger than {MAX_REPLY} bytes")
            if len(buf) >= 5 and not buf.startswith(b"HTTP/"):
                raise Violation("the HTTP reply does not start with a valid status line "
                                "(is this an HTTP proxy?)")
            self._buf = buf
            return NEED_MORE
        end += len(_END)
        if end > MAX_REPLY:
            raise Violation(f"the HTTP reply headers are larger than {MAX_REPLY} bytes")
        code = status_code(buf[:end])
        if not 200 <= code < 300:
            raise Refused(code, describe("http", code))
        self._done, self._buf = True, b""
        return Done(buf[end:])
