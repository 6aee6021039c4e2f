"""The client side of a SOCKS4 CONNECT (and SOCKS4a, which is the same here).

The request is VN=4 CD=1 DSTPORT DSTIP USERID NUL, the reply exactly 8 bytes:
VN=0 CD DSTPORT DSTIP. SOCKS4a differs only when the client sends a host name
(DSTIP 0.0.0.x, the name after USERID); the daemon always has an IP literal
from the kernel and never a name, so both send the same bytes, as python-socks
does for an address.

SOCKS4 has room for an IPv4 address only: an IPv6 destination is refused
before any byte is sent (the constructor raises ValueError).
"""

from __future__ import annotations

from metaproxy.protocol import address
from metaproxy.protocol.handshake import NEED_MORE, CredentialError, Done, Refused, Step, Violation, check_credential
from metaproxy.protocol.replies import Socks4Reply, describe

VERSION = 0x04
CONNECT = 0x01
REPLY_LENGTH = 8


def connect_request(dest_ip: str, dest_port: int, user_id: bytes = b"") -> bytes:
    packed = address.pack(dest_ip)
    if len(packed) != 4:
        raise ValueError("SOCKS4 cannot carry an IPv6 destination")
    if b"\0" in user_id:
        raise CredentialError("a SOCKS4 user id cannot contain a NUL byte")
    check_credential("SOCKS4 user id", user_id)
    return bytes((VERSION, CONNECT)) + dest_port.to_bytes(2, "big") + packed + user_id + b"\0"


class Socks4:
    __slots__ = ("_request", "_buf", "_done")

    def __init__(self, dest_ip: str, dest_port: int, user_id: str = "") -> None:
        self._request = connect_request(dest_ip, dest_port, user_id.encode())
        self._buf = b""
        self._done = False

    @property
    def want(self) -> int:
        return 0 if self._done else REPLY_LENGTH - len(self._buf)

    def first(self) -> bytes:
        return self._request

    def receive(self, data: bytes) -> Step:
        if self._done:
            raise Violation("the SOCKS4 handshake is already over")
        buf = self._buf + data
        if len(buf) < REPLY_LENGTH:
            self._buf = buf
            return NEED_MORE
        # VN is 0 in the protocol; some servers echo 4. Neither changes the meaning.
        if buf[0] not in (0x00, VERSION):
            raise Violation(f"the SOCKS4 reply has version 0x{buf[0]:02x}, not 0x00")
        if buf[1] != Socks4Reply.GRANTED:
            raise Refused(buf[1], describe("socks4", buf[1]))
        self._done, self._buf = True, b""
        return Done(buf[REPLY_LENGTH:])
