"""What the load, fault and soak runs measure on the running daemon, and how they drive it.

Everything is read from /proc by PID (descriptors by kind, RSS, CPU time) or
from the daemon's own log (the SIGUSR1 counters line), so the daemon needs no
test hook. The traffic and echo helpers start tests/soak/{traffic,echo}.py
in the lab's namespaces, recorded by the lab for teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from tests.system.lab import PYTHON, Lab, LabError, Namespace, Process

HERE = Path(__file__).resolve().parent
ECHO_PORT = 7000
_COUNTERS = re.compile(r"counters: (\d+) open, (\d+) total, (\d+) refused, (\d+) upstream failures; "
                       r"(\d+) bytes up, (\d+) bytes down; (\d+) pipes in use")
_TICK = os.sysconf("SC_CLK_TCK")


# ---- /proc ------------------------------------------------------------------------------

def fd_kinds(pid: int) -> Counter[str]:
    """The process's descriptors by kind: socket, pipe, anon_inode, file."""
    kinds: Counter[str] = Counter()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed while we looked
        kinds[target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"] += 1
    return kinds


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LabError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process itself."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass(frozen=True)
class Counters:
    open: int
    total: int
    refused: int
    failed: int
    bytes_up: int
    bytes_down: int
    pipes: int


class LogSource(Protocol):
    """The part of tests.system.daemon.Daemon that the probes use."""

    def mark(self) -> int: ...
    def log_since(self, mark: int) -> str: ...


def counters(pid: int, log: LogSource, timeout: float = 5) -> Counters:
    """SIGUSR1 the daemon and parse the counters line it logs in answer."""
    mark = log.mark()
    os.kill(pid, signal.SIGUSR1)
    for _ in range(int(timeout / 0.05) + 1):
        found = _COUNTERS.findall(log.log_since(mark))
        if found:
            return Counters(*map(int, found[-1]))
        time.sleep(0.05)
    raise LabError(f"no counters line within {timeout}s of SIGUSR1:\n{log.log_since(mark)[-2000:]}")


@dataclass(frozen=True)
class Snapshot:
    sockets: int
    pipes: int
    fds: int
    rss_kb: int
    counters: Counters

    def __str__(self) -> str:
        c = self.counters
        return (f"{self.fds} fds ({self.sockets} sockets, {self.pipes} pipes), RSS {self.rss_kb / 1024:.1f} MiB, "
                f"{c.open} open / {c.total} total / {c.refused} refused / {c.failed} upstream failures, "
                f"{c.pipes} pipes in use")


def snapshot(pid: int, log: LogSource) -> Snapshot:
    # Counters first: a relay closes its sockets before it counts itself closed,
    # so descriptors read after "0 open" can no longer include its sockets.
    c = counters(pid, log)
    kinds = fd_kinds(pid)
    return Snapshot(sockets=kinds["socket"], pipes=kinds["pipe"], fds=sum(kinds.values()),
                    rss_kb=rss_kb(pid), counters=c)


def settle(pid: int, log: LogSource, timeout: float = 20) -> Snapshot:
    """Wait (bounded) until the daemon reports nothing open, then take a snapshot."""
    snap = snapshot(pid, log)
    for _ in range(int(timeout / 0.5)):
        if snap.counters.open == 0 and snap.counters.pipes == 0:
            break
        time.sleep(0.5)
        snap = snapshot(pid, log)
    return snap


# ---- peers and traffic ------------------------------------------------------------------

def start_echo(lab: Lab, addresses: Sequence[str], port: int = ECHO_PORT, workers: int = 2) -> Process:
    process = lab.web.spawn(f"echo-{port}", [PYTHON, str(HERE / "echo.py"), str(port), str(workers), *addresses])
    for address in addresses:
        lab.web.wait_tcp(address, port, process=process)
    return process


def spawn_traffic(ns: Namespace, name: str, host: str, port: int, clients: int, *args: str) -> Process:
    return ns.spawn(name, [PYTHON, str(HERE / "traffic.py"), "--host", host, "--port", str(port),
                           "--clients", str(clients), *args])


def summary_of(process: Process) -> dict:
    """The JSON summary a finished traffic.py printed last."""
    for line in reversed(process.output().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise LabError(f"{process.name} printed no summary (exit {process.popen.returncode}):\n"
                   f"{process.output()[-3000:]}")


def wait_all(processes: Sequence[Process], timeout: float) -> None:
    """Wait for every process, bounded; a straggler is killed and reported."""
    deadline = time.monotonic() + timeout
    for process in processes:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            process.popen.wait(timeout=remaining)
        except Exception:
            process.stop()
            raise LabError(f"{process.name} still running after {timeout}s:\n{process.output()[-3000:]}")


def merge(summaries: Sequence[dict]) -> dict:
    total: dict = {"clients": 0, "completed": 0, "aborted": 0, "failed": 0, "bytes_sent": 0,
                   "bytes_verified": 0, "bytes_lost": 0, "errors": []}
    kinds: Counter[str] = Counter()
    for s in summaries:
        for key in total:
            total[key] += s[key]
        kinds.update(s.get("error_kinds", {}))
    total["error_kinds"] = dict(kinds)
    return total
