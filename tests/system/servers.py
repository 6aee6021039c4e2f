"""Small TCP servers for the lab, run with /usr/bin/python3 in a namespace.

    servers.py sink   PORT ADDR...   read to EOF, then reply with the sha256 hex of what
                                     came in, then close (upload and half-close tests)
    servers.py silent PORT ADDR...   accept and never send a byte (an upstream that hangs)
    servers.py banner PORT ADDR...   speak first, like SSH: send BANNER on accept, then echo
                                     every byte back; pass our peer's EOF on as a half-close

PORT may be a comma-separated list (one listener per port and address). Each
connection gets a thread; the process runs until it is killed.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading

BANNER = b"SSH-2.0-metaproxy-test\r\n"


def sink(conn: socket.socket) -> None:
    digest = hashlib.sha256()
    total = 0
    while chunk := conn.recv(1 << 16):
        digest.update(chunk)
        total += len(chunk)
    conn.sendall(f"{digest.hexdigest()} {total}\n".encode())
    conn.close()


def silent(conn: socket.socket) -> None:
    # Hold the connection open and say nothing until the peer goes away.
    while conn.recv(1 << 16):
        pass
    conn.close()


def banner(conn: socket.socket) -> None:
    # The server talks before the client has said anything, so a relay that
    # reads a proxy reply greedily would swallow these bytes.
    conn.sendall(BANNER)
    while chunk := conn.recv(1 << 16):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)
    conn.close()


HANDLERS = {"sink": sink, "silent": silent, "banner": banner}


def serve(listener: socket.socket, handler: object) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in HANDLERS:
        print(__doc__, file=sys.stderr)
        return 64
    handler, ports, addresses = HANDLERS[argv[0]], [int(p) for p in argv[1].split(",")], argv[2:]
    threads = []
    for port in ports:
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((address, port))
            listener.listen(128)
            thread = threading.Thread(target=serve, args=(listener, handler), daemon=True)
            thread.start()
            threads.append(thread)
    print(f"{argv[0]} listening on port {argv[1]}", flush=True)
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
