"""make bench: metaproxy against redsocks and the direct path, in one run.

    /usr/bin/python3 bench/run.py [--smoke] [--reps N] [--loop default|uvloop]
                                  [--only bulk,conn,idle] [--json FILE] [--keep]

Builds its own namespaces (netlab.py), starts nginx, iperf3 and an echo server
in web, dante in gateway, and both proxies in client, then measures, for each
path, with the repetitions interleaved so drift hits all paths alike:

1. bulk: one iperf3 stream (-R: web sends) for a few seconds; throughput, and
   the proxy's CPU seconds (utime+stime from /proc/PID/stat) per GB relayed;
2. conn: wrk, 50 connections, ``Connection: close`` on a 100-byte file; new
   connections per second, p50 and p99 latency, the proxy's CPU per 1,000;
3. idle: N connections to the echo server, each checked end to end as it
   opens, then all checked again at once; the proxy's VmRSS per connection,
   and its VmRSS after they close against before they opened.

The direct path goes through the gateway's kernel forwarding instead of
dante, so it is the ceiling of the network and endpoints, not a proxy: it
has no CPU or memory figures. Every figure is the median of the
repetitions; ``ratio`` is project/redsocks. One ``BENCH`` line per metric.

Must run as root with Debian's /usr/bin/python3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from netlab import PATH_IPS, PYTHON, BenchError, Net, Process, run  # noqa: E402
from tests.system.lab import LabError  # noqa: E402

PATHS = ("project", "redsocks", "direct")
PROXIES = ("project", "redsocks")
TOOLS = {"danted": "dante-server", "nginx": "nginx-light", "redsocks": "redsocks", "wrk": "wrk",
         "iperf3": "iperf3", "ss": "iproute2", "iptables-restore": "iptables"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = 4


@dataclass(frozen=True)
class Plan:
    reps: int
    bulk_seconds: float
    conn_seconds: float
    conn_concurrency: int
    idle_n: int
    alarm: int  # hard ceiling for the whole run, in seconds


FULL = Plan(reps=3, bulk_seconds=3, conn_seconds=5, conn_concurrency=50, idle_n=9000, alarm=290)
SMOKE = Plan(reps=1, bulk_seconds=1, conn_seconds=1, conn_concurrency=50, idle_n=300, alarm=60)


@dataclass(frozen=True)
class Target:
    text: str
    check: Callable[[dict[str, float]], bool]


# metric -> (unit, lower_is_better, target or None)
METRICS: dict[str, tuple[str, bool, Target | None]] = {
    "bulk_gbit_s": ("Gbit/s", False, None),
    "cpu_s_per_gb": ("s", True, Target("<= redsocks", lambda m: m["ratio"] <= 1.0)),
    "conn_per_s": ("1/s", False, Target(">= redsocks", lambda m: m["ratio"] >= 1.0)),
    "conn_p50_ms": ("ms", True, None),
    "conn_p99_ms": ("ms", True, Target("<= redsocks", lambda m: m["ratio"] <= 1.0)),
    "cpu_s_per_1k_conn": ("s", True, Target("<= 1.3x redsocks", lambda m: m["ratio"] <= 1.3)),
    "idle_held": ("conns", False, None),  # target set from the plan's N in main()
    "idle_rss_bytes_per_conn": ("B", True, Target("<= 4096 B", lambda m: m["project"] <= 4096)),
    "idle_rss_after_close_pct": ("%", True, Target("<= +10% of before", lambda m: m["project"] <= 10.0)),
}


@dataclass
class Results:
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, path: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault(metric, {}).setdefault(path, []).append(value)

    def median(self, metric: str, path: str) -> float | None:
        got = self.values.get(metric, {}).get(path)
        return statistics.median(got) if got else None


# ---- /proc ---------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- the three measurements ----------------------------------------------------

class Bench:
    def __init__(self, net: Net, plan: Plan, starters: dict[str, Callable[[], Process]],
                 results: Results) -> None:
        self.net, self.plan, self.starters, self.results = net, plan, starters, results
        self.proxies = {path: start() for path, start in starters.items()}

    def restart(self, path: str) -> Process:
        """A fresh proxy process, so that memory figures start from a clean heap."""
        self.net.stop(self.proxies[path])
        self.proxies[path] = self.starters[path]()
        return self.proxies[path]

    def _alive(self, path: str) -> None:
        p = self.proxies.get(path)
        if p is not None and not p.alive():
            raise BenchError(f"{path} died:\n{p.output(2000)}")

    def _cpu(self, path: str) -> float | None:
        p = self.proxies.get(path)
        return cpu_seconds(p.pid) if p is not None else None

    def bulk(self, path: str) -> None:
        ip = PATH_IPS[path]
        t = self.plan.bulk_seconds
        before = self._cpu(path)
        out = run(self.net.client.argv(["iperf3", "-c", ip, "-p", str(peers.IPERF_PORT), "-R",
                                        "-t", f"{t:g}", "-J"]), timeout=t + 20, check=False)
        after = self._cpu(path)
        self._alive(path)
        try:
            received = json.loads(out.stdout)["end"]["sum_received"]
        except (ValueError, KeyError) as e:
            raise BenchError(f"iperf3 via {path} failed: {out.stdout[-800:]!r} {out.stderr[-400:]!r}") from e
        gb = received["bytes"] / 1e9
        self.results.add("bulk_gbit_s", path, received["bits_per_second"] / 1e9)
        if before is not None and after is not None and gb > 0:
            self.results.add("cpu_s_per_gb", path, (after - before) / gb)

    def conn(self, path: str) -> None:
        ip = PATH_IPS[path]
        d = self.plan.conn_seconds
        before = self._cpu(path)
        out = run(self.net.client.argv([
            "wrk", "-t1", f"-c{self.plan.conn_concurrency}", f"-d{d:g}s", "--latency", "--timeout", "5s",
            "-H", "Connection: close", f"http://{ip}/small"]), timeout=d + 30, check=False)
        after = self._cpu(path)
        self._alive(path)
        text = out.stdout.decode(errors="replace")
        parsed = parse_wrk(text)
        if parsed is None:
            raise BenchError(f"wrk via {path} failed:\n{text}{out.stderr.decode(errors='replace')}")
        requests, seconds, p50, p99, errors = parsed
        if errors:
            self.results.notes.append(f"conn via {path}: wrk socket errors: {errors}")
        self.results.add("conn_per_s", path, requests / seconds)
        self.results.add("conn_p50_ms", path, p50)
        self.results.add("conn_p99_ms", path, p99)
        if before is not None and after is not None and requests:
            self.results.add("cpu_s_per_1k_conn", path, (after - before) / (requests / 1000))

    def idle(self, path: str) -> None:
        """N idle connections; RSS per connection, and RSS once they are gone.

        Each repetition starts a fresh proxy and warms it up with a few
        connections (lazy imports, first-use caches), so that "before" is a
        clean, warm heap: a heap that earlier tests grew would hide the cost.
        """
        proxy = self.restart(path) if path in self.proxies else None
        base_kb = base_fds = 0
        if proxy is not None:
            fresh_fds = fd_count(proxy.pid)
            self._hold(path, WARM_UP)
            base_kb, base_fds = _settle(proxy.pid, fresh_fds)
        opened, alive, held_kb = self._hold(path, self.plan.idle_n, proxy)
        self._alive(path)
        self.results.add("idle_held", path, float(min(opened["ok"], alive)))
        if opened["failed"]:
            self.results.notes.append(f"idle via {path}: {opened['ok']} opened, {opened['failed']} failed, "
                                      f"{alive} alive at once")
        if proxy is None or not opened["ok"]:
            return
        self.results.add("idle_rss_bytes_per_conn", path, (held_kb - base_kb) * 1024 / opened["ok"])
        after_kb, _ = _settle(proxy.pid, base_fds)
        self.results.notes.append(f"idle via {path}: VmRSS kB before={base_kb} held={held_kb} after={after_kb} "
                                  f"for {opened['ok']}")
        self.results.add("idle_rss_after_close_pct", path, (after_kb - base_kb) * 100 / base_kb)

    def _hold(self, path: str, n: int, proxy: Process | None = None) -> tuple[dict[str, int], int, int]:
        """Open n checked connections, read the proxy's RSS, check all at once, close.

        Returns the holder's report, how many answered at once, and VmRSS (kB).
        """
        holder = self.net.client.spawn(f"holder-{path}", [
            PYTHON, str(peers.HERE / "holder.py"), PATH_IPS[path], str(peers.ECHO_PORT), str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            opened = _read_json(holder, 60)
            time.sleep(0.5)
            held_kb = rss_kb(proxy.pid) if proxy else 0
            alive = _command(holder, "verify", 30)["alive"]
            _command(holder, "close", 30)
            holder.popen.wait(timeout=10)
        finally:
            if holder.popen.poll() is None:
                holder.popen.kill()
                holder.popen.wait(timeout=5)
            self.net.processes.remove(holder)
        return opened, alive, held_kb


WARM_UP = 64


def _settle(pid: int, base_fds: int, timeout: float = 15) -> tuple[int, int]:
    """Wait until the proxy has closed the test's sockets; then its RSS (kB) and fds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and fd_count(pid) > base_fds + 8:
        time.sleep(0.1)
    time.sleep(0.5)
    return rss_kb(pid), fd_count(pid)


def _read_json(p: Process, timeout: float) -> dict[str, int]:
    assert p.popen.stdout is not None
    ready, _, _ = select.select([p.popen.stdout], [], [], timeout)
    line = p.popen.stdout.readline() if ready else b""
    if not line:
        raise BenchError(f"{p.name} said nothing within {timeout:g}s:\n{p.output(2000)}")
    result: dict[str, int] = json.loads(line)
    return result


def _command(p: Process, command: str, timeout: float) -> dict[str, int]:
    assert p.popen.stdin is not None
    p.popen.stdin.write(command.encode() + b"\n")
    p.popen.stdin.flush()
    return _read_json(p, timeout)


_DURATION = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(text: str) -> tuple[int, float, float, float, str] | None:
    """(requests, seconds, p50 ms, p99 ms, socket errors) from wrk --latency."""
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)", text, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)", text, re.M)
    if not (total and p50 and p99):
        return None
    errors = re.search(r"Socket errors: (.*)", text)
    return (int(total.group(1)), float(total.group(2)) * _DURATION[total.group(3)] / 1e3,
            float(p50.group(1)) * _DURATION[p50.group(2)], float(p99.group(1)) * _DURATION[p99.group(2)],
            errors.group(1) if errors else "")


# ---- report --------------------------------------------------------------------

def report(results: Results, plan: Plan) -> list[str]:
    lines = []
    failed = []
    for metric, (unit, _lower, target) in METRICS.items():
        if metric == "idle_held":
            n = plan.idle_n
            target = Target(f">= {n}", lambda m, n=n: m["project"] >= n)  # type: ignore[misc]
        med = {path: results.median(metric, path) for path in PATHS}
        if med["project"] is None:
            continue
        ratio = med["project"] / med["redsocks"] if med["redsocks"] else None
        fields = [f"metric={metric}", f"unit={unit}"]
        fields += [f"{path}={_fmt(med[path])}" for path in PATHS]
        fields.append(f"ratio={_fmt(ratio)}")
        if target is not None:
            values = {**{k: v for k, v in med.items() if v is not None}, "ratio": ratio if ratio is not None else 0.0}
            try:
                met = target.check(values)
            except KeyError:
                met = False
            fields.append(f"target={target.text.replace(' ', '')} met={'yes' if met else 'no'}")
            if not met:
                failed.append(metric)
        fields.append(f"n={len(results.values[metric]['project'])}")
        lines.append("BENCH " + " ".join(fields))
    lines.append(f"BENCH_SUMMARY targets_missed={','.join(failed) or 'none'}")
    return lines


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0 or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if abs(v) >= 0.01 else f"{v:.2e}"


# ---- main ----------------------------------------------------------------------

def preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("the bench builds network namespaces: run it as root")
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool, path=os.environ.get("PATH", "") +
                                                                     ":/usr/sbin:/sbin") is None]
    if missing:
        raise BenchError(f"missing tools; install them with: apt-get install {' '.join(sorted(set(missing)))}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Children (dante, the proxies, the holder) inherit this: the idle test
    # needs ~2 descriptors per connection in the proxy.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="one short repetition of everything (~10 s), for CI")
    p.add_argument("--reps", type=int, help="repetitions (default 3, smoke 1)")
    p.add_argument("--idle-n", type=int, help="idle connections (default 9000, smoke 300)")
    p.add_argument("--loop", choices=("default", "uvloop"), default="default",
                   help="metaproxy's event loop (uvloop through bench/launch_project.py)")
    p.add_argument("--seccomp", choices=("kill", "log", "off"), default="kill",
                   help="metaproxy's seccomp action (log: find what a variant such as uvloop needs)")
    p.add_argument("--project-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for metaproxy (experiments, e.g. PYTHONMALLOC=malloc)")
    p.add_argument("--isolation", metavar="RULE",
                   help="metaproxy's upstream isolation (default: the daemon's default, as users run it)")
    p.add_argument("--only", default="bulk,conn,idle", help="comma-separated subset of bulk,conn,idle")
    p.add_argument("--json", metavar="FILE", help="also write every raw value here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    a = p.parse_args(argv)
    plan = SMOKE if a.smoke else FULL
    if a.reps or a.idle_n:
        plan = Plan(**{**plan.__dict__, "reps": a.reps or plan.reps, "idle_n": a.idle_n or plan.idle_n})
    phases = [x for x in a.only.split(",") if x]
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    preflight()
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(plan.alarm)
    net = Net(keep_tmp=a.keep)
    results = Results()
    try:
        net.build()
        peers.start_nginx(net)
        peers.start_iperf(net)
        peers.start_echo(net)
        peers.start_dante(net)
        notes: list[str] = []

        def project() -> Process:
            process, note = peers.start_project(net, a.loop, dict(kv.split("=", 1) for kv in a.project_env),
                                                 a.seccomp, a.isolation)
            if note and not notes:
                notes.append(note)
                results.notes.append(f"metaproxy: {note}")
            return process
        bench = Bench(net, plan, {"project": project, "redsocks": lambda: peers.start_redsocks(net)}, results)
        print(f"bench: {plan.reps} repetition(s), namespaces {net.prefix}*, logs in {net.tmp}", flush=True)
        for phase in phases:
            measure = getattr(bench, phase)
            for rep in range(plan.reps):
                order = PATHS[rep % 3:] + PATHS[:rep % 3]
                for path in order:
                    measure(path)
                print(f"bench: {phase} repetition {rep + 1} done at {time.monotonic() - started:.0f}s", flush=True)
        for line in results.notes:
            print(f"BENCH_NOTE {line}")
        for line in report(results, plan):
            print(line)
        print(f"BENCH_INFO seconds={time.monotonic() - started:.0f} python={sys.version.split()[0]} "
              f"kernel={os.uname().release} cpus={os.cpu_count()} loop={a.loop} "
              f"reps={plan.reps} idle_n={plan.idle_n} "
              f"loadavg_before={load_before:.1f} loadavg_after={os.getloadavg()[0]:.1f}")
        if max(load_before, os.getloadavg()[0]) > (os.cpu_count() or 1):
            print("BENCH_NOTE the machine was busy with other work (load average above the CPU count): "
                  "throughput and latency ratios are unreliable; CPU and memory figures much less so")
        if a.json:
            Path(a.json).write_text(json.dumps({"values": results.values, "notes": results.notes}, indent=1))
        return 0
    except LabError as e:  # BenchError, or the lab's own run() and process errors
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        net.close()


def _timeout(_sig: int, _frame: object) -> None:
    raise BenchError("the run took longer than its hard limit; cleaning up")


if __name__ == "__main__":
    sys.exit(main())
