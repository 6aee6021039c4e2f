"""Helpers for tests that count: a counting upstream in the gateway, and the daemon's counters.

``start_counting(world, mode, port)`` runs counting_upstream.py in the gateway
namespace on GATEWAY4 and GATEWAY6; ``CountingUpstream.accepts()`` and
``connects()`` say how many TCP connections and SOCKS5 CONNECT requests reached
it since it became ready (the readiness probes are not counted).

``counters(daemon)`` sends SIGUSR1 and parses the line it logs:

    counters: 0 open, 5 total, 5 refused, 0 upstream failures; 0 bytes up, 0 bytes down;
              0 pipes in use; 5 clients gone before their upstream was asked
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import time
from dataclasses import dataclass

from tests.system.daemon import Daemon
from tests.system.lab import GATEWAY4, GATEWAY6, HERE, PYTHON, Process
from tests.system.peers import World

COUNTERS = re.compile(r"counters: (\d+) open, (\d+) total, (\d+) refused, (\d+) upstream failures; "
                      r"(\d+) bytes up, (\d+) bytes down(?:.*?; (\d+) clients gone)?")
_serial = itertools.count(1)
STOPPED = re.compile(r"stopped: (-?\d+) open, (\d+) total, (\d+) refused, (\d+) upstream failures")


@dataclass
class CountingUpstream:
    process: Process
    port: int
    _accepts_at_start: int = 0

    def _lines(self, word: str) -> int:
        return sum(1 for line in self.process.output().splitlines() if line.split(" ", 1)[0] == word)

    def accepts(self) -> int:
        return self._lines("accept") - self._accepts_at_start

    def connects(self) -> int:
        return self._lines("connect")

    def settle(self, quiet: float = 1.0, timeout: float = 30) -> int:
        """Wait (bounded) until no new connection arrived for `quiet` seconds; the accepts then."""
        last, since = self.accepts(), time.monotonic()
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.1) + 1):
            time.sleep(0.1)
            now = self.accepts()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet or time.monotonic() > deadline:
                break
        return last


def start_counting(world: World, mode: str, port: int) -> CountingUpstream:
    """A counting upstream ("answer" or "silent") on GATEWAY4 and GATEWAY6 at `port`."""
    process = world.lab.gateway.spawn(f"counting-{mode}-{port}-{next(_serial)}", [
        PYTHON, "-u", str(HERE / "counting_upstream.py"), mode, str(port), GATEWAY4, GATEWAY6])
    world.lab.gateway.wait_tcp(GATEWAY4, port, process=process)
    world.lab.gateway.wait_tcp(GATEWAY6, port, process=process)
    upstream = CountingUpstream(process, port)
    # Each readiness probe was one accept; wait for their lines, then count from there.
    for _ in range(100):
        if upstream.accepts() >= 2:
            break
        time.sleep(0.05)
    upstream._accepts_at_start = upstream.accepts()
    return upstream


@dataclass(frozen=True)
class Counts:
    open: int
    total: int
    refused: int
    failed: int
    bytes_up: int = 0
    bytes_down: int = 0
    gone: int | None = None  # None: the daemon's counters line does not say


def counters(daemon: Daemon, timeout: float = 5) -> Counts:
    """SIGUSR1, then the counters line it logged."""
    if daemon.process is None or not daemon.alive():
        raise AssertionError(f"the daemon is not running:\n{daemon.log()[-3000:]}")
    mark = daemon.mark()
    os.kill(daemon.process.pid, signal.SIGUSR1)
    log = daemon.wait_log("counters:", mark, timeout=timeout)
    found = COUNTERS.search(log)
    if not found:
        raise AssertionError(f"no counters line after SIGUSR1:\n{log[-3000:]}")
    values = [None if g is None else int(g) for g in found.groups()]
    return Counts(*values)  # type: ignore[arg-type]


def wait_total(daemon: Daemon, total: int, timeout: float = 30) -> Counts:
    """Poll the counters (bounded) until `total` connections were seen and none is open."""
    got = counters(daemon)
    for _ in range(int(timeout / 0.5) + 1):
        if got.total >= total and got.open == 0:
            return got
        time.sleep(0.5)
        got = counters(daemon)
    return got
