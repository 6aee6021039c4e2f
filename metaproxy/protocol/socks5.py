"""The client side of a SOCKS5 CONNECT (RFC 1928), with RFC 1929 username/password.

Lock step, as python-socks and curl do: greeting, method reply, (auth, auth
reply), request, reply. Nothing is pipelined, because some servers (microsocks
for one) read the greeting with a recv() that would swallow what follows it.

1. With credentials the greeting offers "no auth" and "username/password"
   (05 02 00 02), so that an upstream without auth still works under the
   default isolation. Tor picks username/password whenever it is offered,
   which is what isolates its streams.
2. The reply is read exactly: 5 bytes (VER REP RSV ATYP and the first address
   byte, which for a name is its length), then the rest of the address and the
   port. The bound address is never decoded: it may be any bytes.
3. A failure code is reported as soon as it is read; servers often close
   without sending the rest of a failed reply.
"""

from __future__ import annotations

from metaproxy.protocol import address
from metaproxy.protocol.handshake import NEED_MORE, Done, Refused, Send, Step, Violation, check_credential
from metaproxy.protocol.replies import describe

VERSION = 0x05
NO_AUTH, USERNAME_PASSWORD, NO_ACCEPTABLE = 0x00, 0x02, 0xFF
CONNECT = 0x01
ATYP_IPV4, ATYP_NAME, ATYP_IPV6 = 0x01, 0x03, 0x04
_ADDRESS_REST = {ATYP_IPV4: 4 - 1 + 2, ATYP_IPV6: 16 - 1 + 2}  # after the first address byte

_METHOD, _AUTH, _HEAD, _TAIL, _DONE = range(5)


def connect_request(dest_ip: str, dest_port: int) -> bytes:
    """VER CMD RSV ATYP DST.ADDR DST.PORT for an IP literal (the daemon never has names)."""
    packed = address.pack(dest_ip)
    atyp = ATYP_IPV6 if len(packed) == 16 else ATYP_IPV4
    return bytes((VERSION, CONNECT, 0, atyp)) + packed + dest_port.to_bytes(2, "big")


def auth_request(username: bytes, password: bytes) -> bytes:
    """RFC 1929: VER(1) ULEN UNAME PLEN PASSWD."""
    check_credential("SOCKS5 username", username)
    check_credential("SOCKS5 password", password)
    return bytes((1, len(username))) + username + bytes((len(password),)) + password


class Socks5:
    __slots__ = ("_state", "_want", "_buf", "_auth", "_request")

    def __init__(self, dest_ip: str, dest_port: int, credentials: tuple[str, str] | None = None) -> None:
        self._auth = auth_request(credentials[0].encode(), credentials[1].encode()) if credentials else b""
        self._request = connect_request(dest_ip, dest_port)
        self._state = _METHOD
        self._want = 2
        self._buf = b""

    @property
    def want(self) -> int:
        return self._want - len(self._buf)

    def first(self) -> bytes:
        if self._auth:
            return bytes((VERSION, 2, NO_AUTH, USERNAME_PASSWORD))
        return bytes((VERSION, 1, NO_AUTH))

    def receive(self, data: bytes) -> Step:
        buf = self._buf + data if self._buf else data
        if self._state == _HEAD and 2 <= len(buf) < self._want:
            self._check_head(buf)  # a refusal, before a close that may cut the reply short
        while len(buf) >= self._want:
            frame, buf = buf[:self._want], buf[self._want:]
            step = self._frame(frame)
            if step is not NEED_MORE:
                self._buf = b""
                if isinstance(step, Done):
                    return Done(buf)
                if buf:
                    raise Violation("the SOCKS5 server sent more before it had our next message")
                return step
        self._buf = buf
        return NEED_MORE

    def _frame(self, frame: bytes) -> Step:
        state = self._state
        if state == _METHOD:
            return self._method(frame)
        if state == _AUTH:
            if frame[0] != 0x01:
                raise Violation(f"the SOCKS5 auth reply has version 0x{frame[0]:02x}, not 0x01 (RFC 1929)")
            if frame[1] != 0x00:
                raise Refused(frame[1], "username/password rejected (check username and password)")
            return self._send_request()
        if state == _HEAD:
            self._check_head(frame)
            atyp = frame[3]
            if atyp == ATYP_NAME:
                rest = frame[4] + 2
            elif atyp in _ADDRESS_REST:
                rest = _ADDRESS_REST[atyp]
            else:
                raise Violation(f"the SOCKS5 reply has the unknown address type 0x{atyp:02x}")
            self._state, self._want = _TAIL, rest
            return NEED_MORE
        if state == _TAIL:
            self._state, self._want = _DONE, 0
            return Done()
        raise Violation("the SOCKS5 handshake is already over")

    @staticmethod
    def _check_head(head: bytes) -> None:
        if head[0] != VERSION:
            raise Violation(f"the SOCKS5 reply has version 0x{head[0]:02x}, not 0x05")
        if head[1] != 0x00:
            raise Refused(head[1], describe("socks5", head[1]))
        if len(head) > 2 and head[2] != 0x00:
            raise Violation(f"the SOCKS5 reply has 0x{head[2]:02x} in its reserved byte, not 0x00")

    def _method(self, frame: bytes) -> Step:
        if frame[0] != VERSION:
            raise Violation(f"the SOCKS5 method reply has version 0x{frame[0]:02x}, not 0x05 "
                            "(is this a SOCKS5 server?)")
        method = frame[1]
        if method == USERNAME_PASSWORD and self._auth:
            self._state, self._want = _AUTH, 2
            return Send(self._auth)
        if method == NO_AUTH:
            return self._send_request()
        if method == NO_ACCEPTABLE:
            raise Refused(method, "the server accepts none of the offered authentication methods"
                          + ("" if self._auth else " (does it need a username and password?)"))
        raise Violation(f"the SOCKS5 server chose the method 0x{method:02x}, which was not offered")

    def _send_request(self) -> Step:
        self._state, self._want = _HEAD, 5
        return Send(self._request)
