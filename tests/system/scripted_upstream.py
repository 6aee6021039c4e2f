"""A scripted upstream proxy: SOCKS5, SOCKS4, SOCKS4a and HTTP CONNECT on one port.

    scripted_upstream.py PORT ADDR...

Real proxies send their reply, then relay whatever the destination says, and
how those bytes fall into segments depends on timing. This peer makes the hard
case certain, for a destination that speaks first (SSH, SMTP):

1. It answers the handshake (it tells the protocol from the first byte: 5, 4, or
   the C of CONNECT). SOCKS5 accepts no auth and any username/password.
2. It connects to the destination itself. Only IP literals: it never resolves.
3. It waits (bounded) until the destination's first line has arrived.
4. It writes its success reply AND that line with ONE send(), with TCP_NODELAY, so
   that both leave in one segment. A client must read the reply exactly and hand
   the rest to the application.
5. It relays both ways; an EOF is passed on as a half-close.

HTTP CONNECT is parsed as RFC 9110 says: an IPv6 authority must be bracketed
(``CONNECT [2001:db8::1]:22``); an unbracketed one is refused with 400.

Each request is logged on stdout, one line, e.g.:

    socks5 CONNECT 198.51.100.2 8111: reply+banner 34/34 bytes in one send()
    http refused 'CONNECT 2001:db8:2::2:8114 HTTP/1.1': 400 IPv6 authority without brackets
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
import threading

HANDSHAKE_TIMEOUT = 10.0
BANNER_TIMEOUT = 5.0
MAX_HEADER = 8192
MAX_FIELD = 255
MAX_BANNER = 4096


class Refused(Exception):
    """The handshake fails: `reply` goes to the client, `why` to the log."""

    def __init__(self, reply: bytes, why: str) -> None:
        super().__init__(why)
        self.reply = reply


class Reader:
    """Reads from a socket exactly as much as asked (the HTTP header may read past its end)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(n - len(self.buffer))
            if not chunk:
                raise EOFError(f"EOF after {len(self.buffer)} of {n} bytes")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def until(self, end: bytes, limit: int) -> bytes:
        """Up to and including `end`, which must come within `limit` bytes."""
        while end not in self.buffer:
            if len(self.buffer) >= limit:
                raise Refused(b"", f"no {end!r} in the first {limit} bytes")
            chunk = self.sock.recv(limit - len(self.buffer))
            if not chunk:
                raise EOFError(f"EOF before {end!r}")
            self.buffer += chunk
        index = self.buffer.index(end) + len(end)
        data, self.buffer = self.buffer[:index], self.buffer[index:]
        return data


def ip_literal(text: str, refusal: bytes) -> str:
    """The address, if text is an IP literal; this peer never resolves names."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise Refused(refusal, f"not an IP literal: {text!r}") from None


def connect(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# ---- the three handshakes: each returns (destination socket, success reply, log label) ----

def socks5(reader: Reader, client: socket.socket) -> tuple[socket.socket, bytes, str]:
    _, count = reader.exact(2)
    methods = reader.exact(count)
    if 2 in methods:
        client.sendall(b"\x05\x02")
        if reader.exact(1) != b"\x01":
            raise Refused(b"\x01\x01", "RFC 1929 version is not 1")
        reader.exact(reader.exact(1)[0])          # username: any
        reader.exact(reader.exact(1)[0])          # password: any
        client.sendall(b"\x01\x00")
    elif 0 in methods:
        client.sendall(b"\x05\x00")
    else:
        raise Refused(b"\x05\xff", f"no acceptable method in {methods.hex()}")
    version, command, _, atyp = reader.exact(4)
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, reader.exact(4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, reader.exact(16))
    elif atyp == 3:
        host = reader.exact(reader.exact(1)[0]).decode("ascii", "backslashreplace")
    else:
        raise Refused(b"\x05\x08\x00\x01" + bytes(6), f"address type {atyp:#x}")
    (port,) = struct.unpack("!H", reader.exact(2))
    if version != 5 or command != 1:
        raise Refused(b"\x05\x07\x00\x01" + bytes(6), f"version {version} command {command}")
    try:
        dest = connect(ip_literal(host, b"\x05\x04\x00\x01" + bytes(6)), port)
    except OSError as e:
        raise Refused(b"\x05\x05\x00\x01" + bytes(6), f"connect {host} {port}: {e}") from e
    # The reply names the address we connect from, as real servers do: 10 bytes
    # for IPv4, 22 for IPv6, so a client that assumes one length loses bytes.
    bound = dest.getsockname()
    if dest.family == socket.AF_INET6:
        address = b"\x04" + socket.inet_pton(socket.AF_INET6, bound[0])
    else:
        address = b"\x01" + socket.inet_pton(socket.AF_INET, bound[0])
    return dest, b"\x05\x00\x00" + address + struct.pack("!H", bound[1]), f"socks5 CONNECT {host} {port}"


def socks4(reader: Reader, client: socket.socket) -> tuple[socket.socket, bytes, str]:
    _, command = reader.exact(2)
    (port,) = struct.unpack("!H", reader.exact(2))
    raw = reader.exact(4)
    reader.until(b"\x00", MAX_FIELD + 1)       # user id: any
    kind = "socks4"
    host = socket.inet_ntop(socket.AF_INET, raw)
    if raw[:3] == b"\x00\x00\x00" and raw[3] != 0:
        kind = "socks4a"                        # 0.0.0.x: a host name follows
        host = reader.until(b"\x00", MAX_FIELD + 1)[:-1].decode("ascii", "backslashreplace")
    if command != 1:
        raise Refused(b"\x00\x5b" + bytes(6), f"{kind} command {command}")
    try:
        dest = connect(ip_literal(host, b"\x00\x5b" + bytes(6)), port)
    except OSError as e:
        raise Refused(b"\x00\x5b" + bytes(6), f"connect {host} {port}: {e}") from e
    return dest, b"\x00\x5a" + struct.pack("!H", port) + bytes(4), f"{kind} CONNECT {host} {port}"


def http(reader: Reader, client: socket.socket) -> tuple[socket.socket, bytes, str]:
    header = reader.until(b"\r\n\r\n", MAX_HEADER)
    line = header.split(b"\r\n", 1)[0].decode("ascii", "backslashreplace")
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != "CONNECT" or not parts[2].startswith("HTTP/1."):
        raise Refused(b"HTTP/1.1 400 Bad Request\r\n\r\n", f"not a CONNECT line: {line!r}")
    authority = parts[1]
    if authority.startswith("["):
        host, sep, port_text = authority[1:].partition("]:")
        if not sep or ":" not in host:
            raise Refused(b"HTTP/1.1 400 Bad Request\r\n\r\n", f"{line!r}: 400 bad bracketed authority")
    else:
        host, _, port_text = authority.rpartition(":")
        if ":" in host:
            raise Refused(b"HTTP/1.1 400 Bad Request\r\n\r\n", f"{line!r}: 400 IPv6 authority without brackets")
    if not port_text.isdigit():
        raise Refused(b"HTTP/1.1 400 Bad Request\r\n\r\n", f"{line!r}: 400 bad port")
    try:
        dest = connect(ip_literal(host, b"HTTP/1.1 400 Bad Request\r\n\r\n"), int(port_text))
    except OSError as e:
        raise Refused(b"HTTP/1.1 502 Bad Gateway\r\n\r\n", f"connect {authority}: {e}") from e
    return dest, b"HTTP/1.1 200 Connection established\r\n\r\n", f"http {line}"


HANDSHAKES = {5: socks5, 4: socks4, ord("C"): http}


# ---- one connection ---------------------------------------------------------------------

def first_line(dest: socket.socket) -> bytes:
    """What the destination says first, up to its first newline (bounded in time and size)."""
    dest.settimeout(BANNER_TIMEOUT)
    data = b""
    try:
        while b"\n" not in data and len(data) < MAX_BANNER:
            chunk = dest.recv(MAX_BANNER - len(data))
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    dest.settimeout(None)
    return data


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(1 << 16):
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        # A reset on one side: make sure the other side's pump ends too.
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def handle(client: socket.socket) -> None:
    client.settimeout(HANDSHAKE_TIMEOUT)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = Reader(client)
    dest = None
    try:
        first = client.recv(1, socket.MSG_PEEK)
        if not first or first[0] not in HANDSHAKES:
            raise Refused(b"", f"unknown protocol, first byte {first.hex() or 'EOF'}")
        handshake = HANDSHAKES[first[0]]
        try:
            dest, reply, label = handshake(reader, client)
        except Refused as e:
            print(f"{handshake.__name__} refused {e}", flush=True)
            if e.reply:
                client.sendall(e.reply)
            return
        banner = first_line(dest)
        message = reply + banner
        sent = client.send(message)
        print(f"{label}: reply+banner {sent}/{len(message)} bytes in one send()", flush=True)
        if sent < len(message):
            client.sendall(message[sent:])
        client.settimeout(None)
        if reader.buffer:
            dest.sendall(reader.buffer)
        other = threading.Thread(target=pump, args=(dest, client), daemon=True)
        other.start()
        pump(client, dest)
        other.join()
    except (OSError, EOFError, Refused) as e:
        print(f"connection ended in the handshake: {e!r}", flush=True)
    finally:
        client.close()
        if dest is not None:
            dest.close()


def serve(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 64
    port, addresses = int(argv[0]), argv[1:]
    threads = []
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(128)
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()
        threads.append(thread)
    print(f"scripted upstream listening on port {port}", flush=True)
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
