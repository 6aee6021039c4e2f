"""A SOCKS5 upstream that counts what reaches it, run with /usr/bin/python3 in a namespace.

    counting_upstream.py MODE PORT ADDR...

MODE is
    answer   read the greeting (no auth, or RFC 1929 with any username and
             password), read the CONNECT, reply success, then hold the
             connection until the peer goes away; it never contacts anyone;
    silent   accept, and never send a byte (a handshake that never ends).

One line per event on stdout, flushed at once, so that a test counts them in
the log file the lab gives it:

    accept                 a TCP connection arrived
    connect HOST PORT      a SOCKS5 CONNECT request was read (answer mode)

Each connection gets a thread; the process runs until it is killed by its PID.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading

_out = threading.Lock()


def say(line: str) -> None:
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def answer(conn: socket.socket) -> None:
    version, count = exact(conn, 2)
    methods = exact(conn, count)
    if version != 5:
        return
    if 2 in methods:  # username/password: any pair is accepted, as Tor does
        conn.sendall(b"\x05\x02")
        _, ulen = exact(conn, 2)
        exact(conn, ulen)
        plen, = exact(conn, 1)
        exact(conn, plen)
        conn.sendall(b"\x01\x00")
    else:
        conn.sendall(b"\x05\x00")
    _, command, _, atyp = exact(conn, 4)
    if atyp == 1:
        host = str(ipaddress.IPv4Address(exact(conn, 4)))
    elif atyp == 4:
        host = str(ipaddress.IPv6Address(exact(conn, 16)))
    else:
        host = exact(conn, exact(conn, 1)[0]).decode(errors="replace")
    port = int.from_bytes(exact(conn, 2), "big")
    say(f"connect {host} {port}" if command == 1 else f"command {command}")
    conn.sendall(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    while conn.recv(1 << 16):
        pass


def silent(conn: socket.socket) -> None:
    while conn.recv(1 << 16):
        pass


def handle(conn: socket.socket, mode: str) -> None:
    try:
        say("accept")
        conn.settimeout(120)
        (answer if mode == "answer" else silent)(conn)
    except (OSError, EOFError, ValueError):
        pass
    finally:
        conn.close()


def serve(listener: socket.socket, mode: str) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, mode), daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in ("answer", "silent"):
        print(__doc__, file=sys.stderr)
        return 64
    mode, port, addresses = argv[0], int(argv[1]), argv[2:]
    threads = []
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(1024)
        thread = threading.Thread(target=serve, args=(listener, mode), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
