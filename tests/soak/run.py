"""make soak: the daemon under mixed traffic for a long while; memory and descriptors must stay flat.

    /usr/bin/python3 -m tests.soak.run [--minutes 10] [--every 5] [--clients 60]

Builds the namespace lab (tests/system/lab.py) with dante, microsocks and
tinyproxy in the gateway and nginx plus an echo server in the web namespace,
starts one daemon, and for the whole run keeps up, at the same time:

* echo clients through dante over IPv4 and IPv6 (tests/soak/traffic.py: every
  byte checked, with half-closes, slow clients and aborts);
* curl fetching a page through microsocks and through tinyproxy (HTTP
  CONNECT), and now and then the 50 MB file through dante, checked by sha256;
* refusals: a port with no route (RST), an upstream that is down, and one that
  never answers (connect_timeout).

Every --every seconds it samples the daemon's RSS, its descriptors and its
SIGUSR1 counters. After a warm-up (the first fifth of the run), the RSS and
descriptor samples of the last third must not be above those of the first
third by more than a small margin, and their fitted slope must stay under a
limit: otherwise the run fails. At the end the traffic stops, and the daemon
must come back to its warm-up socket count with nothing open.

Exit status 0 if everything held, 1 if not, 2 if the lab could not be built.
It needs root and the lab's tools, like the system tests.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.soak import probe
from tests.system import clients, peers
from tests.system.daemon import Daemon, daemon_section, next_port, start_daemon
from tests.system.lab import GATEWAY4, SYSPATH, WEB4, WEB6, Lab, LabError, Process

ECHO_V4, ECHO_V6 = 7000, 7001
PAGE_MICROSOCKS, PAGE_TINYPROXY, BIG_DANTE = 8101, 8102, 8103
UNROUTED, DOWN, SILENT = 9999, 9003, 9004
REQUIRED = ["ip", "iptables", "ip6tables", "danted", "microsocks", "tinyproxy", "nginx", "curl", "setpriv"]
# Flatness: how much the last third may exceed the first third.
RSS_MARGIN_KB, RSS_MARGIN_SHARE = 8 * 1024, 0.10
FD_MARGIN = 64
RSS_SLOPE_KB_PER_MIN = 1024  # a leak of 1 MiB a minute would be 1.4 GiB a day
FD_SLOPE_PER_MIN = 4


def soak_config(port: int) -> str:
    return daemon_section(port, connect_timeout=10) + f"""\
[upstreams]
    [[dante]]
    type = socks5
    address = {GATEWAY4}:{peers.DANTE_PORT}
    isolation = connection
    [[microsocks]]
    type = socks5
    address = {GATEWAY4}:{peers.MICROSOCKS_PORT}
    isolation = none
    [[tinyproxy]]
    type = http
    address = {GATEWAY4}:{peers.TINYPROXY_PORT}
    [[down]]
    type = socks5
    address = {GATEWAY4}:{peers.DOWN_UPSTREAM_PORT}
    [[silent]]
    type = socks5
    address = {GATEWAY4}:{peers.SILENT_UPSTREAM_PORT}
    connect_timeout = 1
[routes]
{ECHO_V4} = dante
{ECHO_V6} = dante
{BIG_DANTE} = dante
{PAGE_MICROSOCKS} = microsocks
{PAGE_TINYPROXY} = tinyproxy
{DOWN} = down
{SILENT} = silent
"""


@dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int
    open: int
    total: int


@dataclass
class Tally:
    """What the side traffic saw; appended to by the worker threads."""
    pages: int = 0
    big: int = 0
    refusals: int = 0
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 50:
                self.problems.append(text)


def side_traffic(lab: Lab, big_sha256: str, stop: threading.Event, tally: Tally) -> None:
    """curl pages, the big file now and then, and connections that must be refused."""
    out = lab.tmp / "big.out"
    last_big = 0.0
    for _ in range(10**6):  # bounded by the stop event, checked every pass
        if stop.is_set():
            return
        for port in (PAGE_MICROSOCKS, PAGE_TINYPROXY):
            got = clients.curl(lab.client, clients.url(WEB4, port, "/index.html"), timeout=15)
            if got.ok and got.body.decode(errors="replace") == peers.INDEX:
                tally.pages += 1
            else:
                tally.problem(f"page via port {port}: exit {got.code}: {got.stderr.strip()}")
        if time.monotonic() - last_big > 30:
            last_big = time.monotonic()
            got = clients.curl(lab.client, clients.url(WEB6, BIG_DANTE, "/big.bin"), out=str(out), timeout=60)
            if got.ok and _sha256(out) == big_sha256:
                tally.big += 1
            else:
                tally.problem(f"big.bin via dante: exit {got.code}: {got.stderr.strip()}")
            out.unlink(missing_ok=True)
        for port in (UNROUTED, DOWN, SILENT):
            try:
                outcome = clients.exchange(lab.client, WEB4, port, b"x", timeout=5)
            except OSError as e:
                outcome = clients.Outcome(b"", True, 0.0, repr(e))
            if outcome.reset or (outcome.data == b"" and not outcome.error):
                tally.refusals += 1
            else:
                tally.problem(f"port {port} was not refused: {outcome}")
        stop.wait(1.0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def slope_per_minute(samples: list[Sample], key: str) -> float:
    xs = [s.t / 60 for s in samples]
    ys = [float(getattr(s, key)) for s in samples]
    if len(xs) < 3 or max(xs) == min(xs):
        return 0.0
    return statistics.linear_regression(xs, ys).slope


def verdict(samples: list[Sample]) -> list[str]:
    """Reasons the run failed the flatness check (empty: flat)."""
    steady = samples[max(1, len(samples) // 5):]
    if len(steady) < 6:
        return [f"too few samples after the warm-up ({len(steady)}); run longer"]
    third = len(steady) // 3
    first, last = steady[:third], steady[-third:]
    reasons = []
    rss_first = statistics.median(s.rss_kb for s in first)
    rss_last = statistics.median(s.rss_kb for s in last)
    if rss_last > rss_first + max(RSS_MARGIN_KB, RSS_MARGIN_SHARE * rss_first):
        reasons.append(f"RSS grew: median {rss_first / 1024:.1f} MiB -> {rss_last / 1024:.1f} MiB")
    fd_first = statistics.median(s.fds for s in first)
    fd_last = statistics.median(s.fds for s in last)
    if fd_last > fd_first + FD_MARGIN:
        reasons.append(f"descriptors grew: median {fd_first:.0f} -> {fd_last:.0f}")
    rss_slope, fd_slope = slope_per_minute(steady, "rss_kb"), slope_per_minute(steady, "fds")
    minutes = (steady[-1].t - steady[0].t) / 60
    if minutes >= 3 and rss_slope > RSS_SLOPE_KB_PER_MIN:
        reasons.append(f"RSS trends up by {rss_slope:.0f} KiB a minute")
    if minutes >= 3 and fd_slope > FD_SLOPE_PER_MIN:
        reasons.append(f"descriptors trend up by {fd_slope:.1f} a minute")
    return reasons


def precondition() -> str | None:
    if os.geteuid() != 0:
        return "the soak run needs root (network namespaces, iptables)"
    missing = [b for b in REQUIRED if shutil.which(b, path=SYSPATH) is None]
    return f"missing programs: {', '.join(missing)}" if missing else None


def soak(args: argparse.Namespace) -> int:
    with Lab() as lab:
        peers.start_dante(lab)
        peers.start_microsocks(lab, peers.MICROSOCKS_PORT, auth=False)
        peers.start_tinyproxy(lab, peers.TINYPROXY_PORT, auth=False)
        peers.start_silent(lab, lab.gateway, "silent-upstream", peers.SILENT_UPSTREAM_PORT, [GATEWAY4])
        _, _, big_sha256 = peers.start_nginx(lab, [PAGE_MICROSOCKS, PAGE_TINYPROXY, BIG_DANTE])
        probe.start_echo(lab, [WEB4], port=ECHO_V4, workers=1)
        probe.start_echo(lab, [WEB6], port=ECHO_V6, workers=1)
        port = next_port()
        daemon = start_daemon(lab, "soak-daemon", soak_config(port), port=port)
        assert daemon.process is not None
        return drive(lab, daemon, daemon.process.pid, big_sha256, args)


def drive(lab: Lab, daemon: Daemon, pid: int, big_sha256: str, args: argparse.Namespace) -> int:
    seconds = args.minutes * 60
    start = time.monotonic()
    print(f"soak: daemon pid {pid}, {args.minutes:g} minutes, sampling every {args.every:g}s", flush=True)
    echo_args = ["--size", str(args.size), "--duration", str(seconds), "--pause", "0.2",
                 "--timeout", "120", "--abort-rate", "0.1", "--slow-rate", "0.05"]
    runs: list[Process] = [
        probe.spawn_traffic(lab.client, "soak-echo-v4", WEB4, ECHO_V4, args.clients, *echo_args),
        probe.spawn_traffic(lab.client, "soak-echo-v6", WEB6, ECHO_V6, max(1, args.clients // 3), *echo_args),
    ]
    stop = threading.Event()
    tally = Tally()
    side = threading.Thread(target=side_traffic, args=(lab, big_sha256, stop, tally), daemon=True)
    side.start()
    samples: list[Sample] = []
    try:
        for _ in range(int(seconds / args.every) + 2):
            now = time.monotonic() - start
            if now > seconds:
                break
            if not daemon.alive():
                print("soak: FAIL the daemon died:\n" + daemon.log()[-3000:])
                return 1
            snap = probe.snapshot(pid, daemon)
            samples.append(Sample(now, snap.rss_kb, snap.fds, snap.counters.open, snap.counters.total))
            if len(samples) % max(1, int(60 / args.every)) == 1:
                print(f"  {now / 60:5.1f} min  RSS {snap.rss_kb / 1024:6.1f} MiB  fds {snap.fds:5d}  "
                      f"open {snap.counters.open:5d}  total {snap.counters.total}", flush=True)
            time.sleep(max(0.0, args.every - (time.monotonic() - start - now)))
    finally:
        stop.set()
        side.join(90)
    probe.wait_all(runs, 180)
    echo = probe.merge([probe.summary_of(r) for r in runs])
    end = probe.settle(pid, daemon)
    return report(samples, echo, tally, end, daemon, time.monotonic() - start)


def report(samples: list[Sample], echo: dict, tally: Tally, end: probe.Snapshot, daemon: Daemon,
           seconds: float) -> int:
    reasons = verdict(samples)
    if echo["failed"] or echo["bytes_lost"]:
        reasons.append(f"echo clients failed: {echo['failed']}, bytes lost {echo['bytes_lost']}: "
                       f"{echo['errors'][:5]}")
    if tally.problems:
        reasons.append(f"{len(tally.problems)} side-traffic problems, first: {tally.problems[:3]}")
    if end.counters.open or end.counters.pipes:
        reasons.append(f"connections left open after the traffic stopped: {end}")
    if samples and end.fds > min(s.fds for s in samples) + FD_MARGIN:
        reasons.append(f"descriptors did not come back: {end.fds} at the end, "
                       f"{min(s.fds for s in samples)} at the lowest sample")
    for bad in ("Traceback", "internal error", "Exception in callback", "Task exception"):
        if bad in daemon.log():
            reasons.append(f"{bad!r} in the daemon log")
    rss = [s.rss_kb for s in samples] or [0]
    fds = [s.fds for s in samples] or [0]
    steady = samples[max(1, len(samples) // 5):] or samples
    print(f"""
soak summary ({seconds / 60:.1f} minutes, {len(samples)} samples)
  connections      {end.counters.total} accepted, {end.counters.refused} refused, {end.counters.failed} upstream failures
  echo clients     {echo['clients']} ({echo['completed']} verified, {echo['aborted']} aborted on purpose, {echo['failed']} failed)
  bytes            {echo['bytes_verified']} verified by sha256, {echo['bytes_lost']} lost
  curl             {tally.pages} pages, {tally.big} x 50 MB checked; {tally.refusals} refusals as expected
  RSS              start {rss[0] / 1024:.1f} MiB, max {max(rss) / 1024:.1f}, end {end.rss_kb / 1024:.1f}; slope {slope_per_minute(steady, 'rss_kb'):+.0f} KiB/min
  descriptors      start {fds[0]}, max {max(fds)}, end {end.fds}; slope {slope_per_minute(steady, 'fds'):+.1f}/min
  verdict          {'FLAT: PASS' if not reasons else 'FAIL'}""")
    for reason in reasons:
        print(f"  - {reason}")
    return 1 if reasons else 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="make soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--clients", type=int, default=60, help="IPv4 echo clients per round (IPv6: a third)")
    p.add_argument("--size", type=int, default=256 * 1024, help="bytes each echo client sends")
    args = p.parse_args(argv)
    reason = precondition()
    if reason:
        print(f"soak: cannot run: {reason}", file=sys.stderr)
        return 2
    try:
        return soak(args)
    except LabError as e:
        print(f"soak: the lab failed: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
