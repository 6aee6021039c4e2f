"""Many concurrent echo clients; every byte is checked. Run in the lab's client namespace.

    traffic.py --host H --port P --clients N --size BYTES [--seed S] [--abort-rate R]
               [--slow-rate R] [--timeout SECONDS] [--rounds K] [--duration SECONDS]

Each client connects to H:P (a destination that REDIRECT sends to the
daemon), then, at the same moment as the others (a barrier after connect),
streams BYTES of random data to the echo server while reading the echo back,
and checks that the echo has the same length and sha256 as what it sent.
Clients follow one of these plans, picked at random:

    echo         send, half-close (FIN), read the echo to EOF; the sender
                 stays at most --window bytes ahead of the echo
    late-read    send everything and half-close, wait a little, then read:
                 the half-closed connection must still carry the echo back
    slow         send in small pieces with pauses (stays open longest)
    abort-send   reset the connection (SO_LINGER 0) part way through sending
    abort-recv   reset it part way through reading the echo

Aborted clients check nothing; every other client must get every byte back.
The window keeps the bytes in flight (and the kernel's TCP memory, which is
shared by the whole machine) bounded: 2,000 clients with 1 MB each in flight
at once would push TCP into memory pressure and slow everyone down.
With --ramp, the connects are spread over that many seconds, and the
transfers start once every client of the process is connected, so all are
open at once. With --rounds or --duration, the whole set of clients runs again and again.
The summary is one JSON line on stdout. The exit status is 0 only if no
client failed and no byte was lost or changed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field

PLANS = ("echo", "late-read", "slow", "abort-send", "abort-recv")
PIECE = 64 * 1024
LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass
class Summary:
    clients: int = 0
    completed: int = 0
    aborted: int = 0
    failed: int = 0
    bytes_sent: int = 0
    bytes_verified: int = 0
    bytes_lost: int = 0
    rounds: int = 0
    seconds: float = 0.0
    plans: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)  # reset, eof, timeout, refused, other

    def error(self, text: str, kind: str = "other") -> None:
        self.failed += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        if len(self.errors) < 20:
            self.errors.append(text)


class Block:
    """Random bytes to send; each client starts at its own offset, so no two send the same."""

    def __init__(self, rng: random.Random, size: int = 1 << 20) -> None:
        self.data = rng.randbytes(size)
        self.view = memoryview(self.data + self.data)

    def piece(self, offset: int, length: int) -> memoryview:
        start = offset % len(self.data)
        return self.view[start:start + min(length, len(self.data))]


async def connect(host: str, port: int, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    sock.close()


class Window:
    """How far the sender may run ahead of the echo."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.received = 0
        self.moved = asyncio.Event()

    def advance(self, n: int) -> None:
        self.received += n
        self.moved.set()

    async def wait(self, sent: int) -> None:
        for _ in range(10**7):  # bounded; the client's timeout ends it sooner
            if self.size <= 0 or sent - self.received < self.size:
                return
            self.moved.clear()
            await self.moved.wait()


async def send_all(sock: socket.socket, block: Block, offset: int, size: int, plan: str,
                   abort_at: int, digest: "hashlib._Hash", window: Window) -> bool:
    """Send ``size`` bytes and half-close; False if the plan says abort first."""
    loop = asyncio.get_running_loop()
    sent = 0
    step = 1500 if plan == "slow" else PIECE
    while sent < size:
        if plan == "abort-send" and sent >= abort_at:
            return False
        await window.wait(sent)
        piece = block.piece(offset + sent, min(step, size - sent))
        await loop.sock_sendall(sock, piece)
        digest.update(piece)
        sent += len(piece)
        if plan == "slow":
            await asyncio.sleep(0.002)
    sock.shutdown(socket.SHUT_WR)
    return True


async def recv_all(sock: socket.socket, plan: str, abort_at: int, digest: "hashlib._Hash",
                   size: int, window: Window) -> tuple[int, bool]:
    """Read to EOF; returns (bytes, True if the plan says abort first)."""
    loop = asyncio.get_running_loop()
    got = 0
    buffer = bytearray(PIECE)
    for _ in range(size + 1000):  # bounded: each pass reads at least one byte or ends
        if plan == "abort-recv" and got >= abort_at:
            return got, True
        n = await loop.sock_recv_into(sock, buffer)
        if n == 0:
            return got, False
        digest.update(memoryview(buffer)[:n])
        got += n
        window.advance(n)
    raise RuntimeError("read loop bound reached")


async def _stop(*tasks: "asyncio.Future[object]") -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def exchange(sock: socket.socket, args: argparse.Namespace, block: Block, rng: random.Random,
                   plan: str, summary: Summary) -> str | None:
    """One client's transfer; returns an error text, or None."""
    size = args.size
    abort_at = rng.randrange(0, size) if plan.startswith("abort") else size + 1
    offset = rng.randrange(0, 1 << 20)
    out, back = hashlib.sha256(), hashlib.sha256()
    window = Window(0 if plan == "late-read" else args.window)
    sender = asyncio.ensure_future(send_all(sock, block, offset, size, plan, abort_at, out, window))
    receiver: asyncio.Future[tuple[int, bool]] | None = None
    try:
        if plan == "late-read":
            await sender
            await asyncio.sleep(rng.uniform(0.05, 0.5))
        receiver = asyncio.ensure_future(recv_all(sock, plan, abort_at, back, size, window))
        if plan.startswith("abort"):
            # Run until the plan's abort point, then reset (SO_LINGER 0 close).
            await (sender if plan == "abort-send" else receiver)
            await _stop(sender, receiver)
            reset(sock)
            summary.aborted += 1
            return None
        got, _ = await receiver
        if sender.done():
            await sender
        else:
            # EOF before the whole echo: the far end closed. The sender may be
            # waiting on the window, which would never move again.
            await _stop(sender)
    finally:
        await _stop(*(t for t in (sender, receiver) if t is not None))
    summary.bytes_sent += size
    if got != size or back.digest() != out.digest():
        summary.bytes_lost += size - got if got < size else size
        return (f"echo mismatch: sent {size} bytes, got {got}, sha256 "
                f"{'equal' if back.digest() == out.digest() else 'different'}")
    summary.completed += 1
    summary.bytes_verified += got
    return None


async def client(index: int, args: argparse.Namespace, block: Block, rng: random.Random,
                 barrier: asyncio.Event, ready: list[int], summary: Summary) -> None:
    plan = pick(rng, args)
    summary.plans[plan] = summary.plans.get(plan, 0) + 1
    sock: socket.socket | None = None
    try:
        if args.ramp:
            await asyncio.sleep(rng.uniform(0, args.ramp))
        sock = await connect(args.host, args.port, args.timeout)
    except (OSError, asyncio.TimeoutError) as e:
        summary.error(f"client {index} ({plan}): connect: {e!r}", "connect")
    finally:
        ready[0] += 1
        if ready[0] >= ready[1]:
            barrier.set()
    if sock is None:
        return
    kind = "eof"  # an echo cut short: the connection ended early but cleanly
    try:
        async with asyncio.timeout(args.timeout):
            await barrier.wait()
            problem = await exchange(sock, args, block, rng, plan, summary)
    except (OSError, TimeoutError) as e:
        problem = repr(e)
        kind = ("timeout" if isinstance(e, TimeoutError) else
                "reset" if isinstance(e, (ConnectionResetError, BrokenPipeError)) else "other")
        summary.bytes_lost += args.size
    finally:
        if sock.fileno() >= 0:
            sock.close()
    if problem:
        summary.error(f"client {index} ({plan}): {problem}", kind)


def pick(rng: random.Random, args: argparse.Namespace) -> str:
    x = rng.random()
    if x < args.abort_rate / 2:
        return "abort-send"
    if x < args.abort_rate:
        return "abort-recv"
    if x < args.abort_rate + args.slow_rate:
        return "slow"
    return "late-read" if rng.random() < args.late_rate else "echo"


async def one_round(args: argparse.Namespace, block: Block, rng: random.Random, summary: Summary) -> None:
    barrier = asyncio.Event()
    ready = [0, args.clients]
    tasks = [asyncio.ensure_future(client(i, args, block, rng, barrier, ready, summary))
             for i in range(args.clients)]
    summary.clients += args.clients
    await asyncio.gather(*tasks)
    summary.rounds += 1


async def run(args: argparse.Namespace) -> Summary:
    rng = random.Random(args.seed)
    block = Block(rng)
    summary = Summary()
    start = time.monotonic()
    for _ in range(args.rounds if not args.duration else 10**9):
        await one_round(args, block, rng, summary)
        if args.duration and time.monotonic() - start >= args.duration:
            break
        if args.pause:
            await asyncio.sleep(args.pause)
    summary.seconds = round(time.monotonic() - start, 3)
    return summary


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    p.add_argument("--abort-rate", type=float, default=0.1)
    p.add_argument("--slow-rate", type=float, default=0.05)
    p.add_argument("--late-rate", type=float, default=0.1, help="of the rest, the share of late-read")
    p.add_argument("--window", type=int, default=128 * 1024, help="bytes a sender may run ahead of its echo")
    p.add_argument("--timeout", type=float, default=120.0, help="per client, connect to last byte")
    p.add_argument("--ramp", type=float, default=0.0,
                   help="spread the connects over this many seconds (all stay open until all are in)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--duration", type=float, default=0.0, help="repeat rounds for this many seconds")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between rounds")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    summary = asyncio.run(run(args))
    out = asdict(summary)
    out["seed"] = args.seed
    print(json.dumps(out), flush=True)
    return 0 if summary.failed == 0 and summary.bytes_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
