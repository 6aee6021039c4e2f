"""An echo server for the load, fault and soak runs; started in the lab's web namespace.

    echo.py PORT WORKERS ADDR...

Every byte that comes in goes back out. When the client half-closes, the
server finishes echoing and half-closes too, so both directions of the relay
carry a FIN. WORKERS processes share the port with SO_REUSEPORT, so that the
echo is not the bottleneck of the run. It runs until it is killed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

CHUNK = 256 * 1024


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass  # the client aborted: nothing to echo to
    finally:
        writer.close()


def listener(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(sockets: list[socket.socket]) -> None:
    servers = [await asyncio.start_server(echo, sock=s, limit=CHUNK) for s in sockets]
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 64
    port, workers, addresses = int(argv[0]), int(argv[1]), argv[2:]
    for _ in range(max(0, workers - 1)):
        if os.fork() == 0:
            break  # a worker: binds its own sockets below (SO_REUSEPORT spreads the load)
    sockets = [listener(a, port) for a in addresses]
    print(f"echo pid {os.getpid()} listening on port {port}", flush=True)
    asyncio.run(serve(sockets))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
