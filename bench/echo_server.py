"""An echo server for the idle test: every byte that arrives goes back.

    echo_server.py PORT

One epoll loop for thousands of connections; a connection that sends EOF is
closed. Runs until it is killed (by PID, by run.py).
"""

from __future__ import annotations

import resource
import selectors
import socket
import sys


def main(port: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(8192)
    listener.setblocking(False)
    sel = selectors.EpollSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                _accept(listener, sel)
            else:
                _echo(key.fileobj, sel)  # type: ignore[arg-type]


def _accept(listener: socket.socket, sel: selectors.BaseSelector) -> None:
    for _ in range(256):
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError:
            return  # out of descriptors: the client's check will fail and say so
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, True)


def _echo(conn: socket.socket, sel: selectors.BaseSelector) -> None:
    try:
        data = conn.recv(4096)
        if data:
            conn.send(data)  # a few bytes into an empty send buffer: never short
            return
    except BlockingIOError:
        return
    except OSError:
        pass
    sel.unregister(conn)
    conn.close()


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
