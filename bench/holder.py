"""Open N connections to an echo server, check each end to end, hold them.

    holder.py IP PORT N [--concurrency C] [--timeout S] [--deadline S]

Each connection is checked as it opens: one byte out, the same byte back.
Then it prints one JSON line {"ok", "failed", "seconds"} and obeys stdin:

    verify   send one byte on every held connection at once and read it back;
             prints {"alive": n, "seconds": t}: all of them relayed at once
    close    close them all (FIN, not RST) and exit

Bounded everywhere: per-connection timeout, an overall deadline for opening,
and opening stops after C failures in a row (the proxy is out of descriptors:
waiting longer tells nothing new). The process exits on stdin EOF, and after
``--lifetime`` seconds whatever happens.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import selectors
import signal
import socket
import sys
import time


def open_all(ip: str, port: int, n: int, concurrency: int, timeout: float,
             deadline: float) -> tuple[list[socket.socket], int, float]:
    sel = selectors.EpollSelector()
    held: list[socket.socket] = []
    inflight: dict[socket.socket, float] = {}
    opened = failed = streak = 0
    start = time.monotonic()
    end = start + deadline
    while (opened < n or inflight) and time.monotonic() < end:
        while opened < n and len(inflight) < concurrency and streak < concurrency:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((ip, port))
            opened += 1
            if err not in (0, errno.EINPROGRESS):
                s.close()
                failed += 1
                streak += 1
                continue
            sel.register(s, selectors.EVENT_WRITE, "connecting")
            inflight[s] = time.monotonic() + timeout
        if not inflight:
            break
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj  # type: ignore[assignment]
            assert isinstance(s, socket.socket)
            ok = _step(s, key.data, sel)
            if ok is None:
                continue
            del inflight[s]
            sel.unregister(s)
            if ok:
                held.append(s)
                streak = 0
            else:
                s.close()
                failed += 1
                streak += 1
        now = time.monotonic()
        for s in [s for s, t in inflight.items() if t < now]:
            del inflight[s]
            sel.unregister(s)
            s.close()
            failed += 1
            streak += 1
    for s in inflight:
        sel.unregister(s)
        s.close()
        failed += 1
    sel.close()
    return held, failed, time.monotonic() - start


def _step(s: socket.socket, state: str, sel: selectors.BaseSelector) -> bool | None:
    """Advance one connection; None while still in progress."""
    try:
        if state == "connecting":
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return False
            s.send(b"h")
            sel.modify(s, selectors.EVENT_READ, "reading")
            return None
        return s.recv(1) == b"h"
    except BlockingIOError:
        return None
    except OSError:
        return False


def verify(held: list[socket.socket], timeout: float) -> tuple[int, float]:
    """One byte on every connection at once; count those that echo it."""
    sel = selectors.EpollSelector()
    start = time.monotonic()
    waiting = 0
    for s in held:
        try:
            s.send(b"v")
            sel.register(s, selectors.EVENT_READ)
            waiting += 1
        except OSError:
            pass
    alive = 0
    end = start + timeout
    while waiting and time.monotonic() < end:
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj  # type: ignore[assignment]
            assert isinstance(s, socket.socket)
            try:
                if s.recv(1) == b"v":
                    alive += 1
            except BlockingIOError:
                continue
            except OSError:
                pass
            sel.unregister(s)
            waiting -= 1
    sel.close()
    return alive, time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("ip")
    p.add_argument("port", type=int)
    p.add_argument("n", type=int)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--timeout", type=float, default=4.0)
    p.add_argument("--deadline", type=float, default=40.0)
    p.add_argument("--lifetime", type=float, default=150.0)
    a = p.parse_args()
    signal.alarm(int(a.lifetime))  # whatever happens, this process goes away
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held, failed, seconds = open_all(a.ip, a.port, a.n, a.concurrency, a.timeout, a.deadline)
    _say({"ok": len(held), "failed": failed, "seconds": round(seconds, 3)})
    for line in sys.stdin:
        command = line.strip()
        if command == "verify":
            alive, t = verify(held, a.timeout * 3)
            _say({"alive": alive, "seconds": round(t, 3)})
        elif command == "close":
            break
    for s in held:
        s.close()
    _say({"closed": len(held)})
    return 0


def _say(obj: dict[str, object]) -> None:
    print(json.dumps(obj), flush=True)


if __name__ == "__main__":
    sys.exit(main())
