"""The benchmark's own network: three namespaces joined by veths.

    client  192.0.2.1/24            proxies under test, load generators, REDIRECT rules
       |  veth
    gateway 192.0.2.2/24            dante (the one upstream for both proxies);
            198.51.100.1/24         forwards only to the direct path's address
       |  veth
    web     198.51.100.10           reached through metaproxy   (REDIRECT to 8675)
            198.51.100.11           reached through redsocks    (REDIRECT to 12345)
            198.51.100.12           reached directly, routed by the gateway

The three paths differ only in the web address the client dials, so the
same tools, ports and servers serve all three. Addresses come only from
RFC 5737; no namespace has a default route, so nothing leaves the machine.

Everything is named per run (``mpb<pid>c`` ...) and every process is recorded
by PID; ``close()`` kills those PIDs (and any process still inside our own
namespaces) and deletes the namespaces, whatever happened before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

SYSPATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
PYTHON = "/usr/bin/python3"

CLIENT, GATEWAY, GATEWAY_OUT = "192.0.2.1", "192.0.2.2", "198.51.100.1"
WEB_BASE = "198.51.100.2"
PATH_IPS = {"project": "198.51.100.10", "redsocks": "198.51.100.11", "direct": "198.51.100.12"}
PROXY_PORTS = {"project": 8675, "redsocks": 12345}


class BenchError(RuntimeError):
    """The bench could not build its network or a helper misbehaved."""


def clean_env(**extra: str) -> dict[str, str]:
    env = {"PATH": SYSPATH, "LANG": "C.UTF-8", "HOME": "/nonexistent"}
    env.update(extra)
    return env


def run(argv: Sequence[str], *, timeout: float = 20, check: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                          env=clean_env())
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: "
                         f"{(proc.stdout + proc.stderr).decode(errors='replace').strip()}")
    return proc


@dataclass
class Spawned:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""


@dataclass
class Net:
    prefix: str = field(default_factory=lambda: f"mpb{os.getpid()}")
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mpbench.")))
    processes: list[Spawned] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    @property
    def client(self) -> str:
        return self.prefix + "c"

    @property
    def gateway(self) -> str:
        return self.prefix + "g"

    @property
    def web(self) -> str:
        return self.prefix + "w"

    # -- building --------------------------------------------------------------

    def build(self) -> None:
        self.tmp.chmod(0o755)  # nginx and dante's children run as nobody
        for ns in (self.client, self.gateway, self.web):
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            self.ip(ns, "link", "set", "lo", "up")
        run(["ip", "-n", self.client, "link", "add", "cg", "type", "veth",
             "peer", "name", "gc", "netns", self.gateway])
        run(["ip", "-n", self.gateway, "link", "add", "gw", "type", "veth",
             "peer", "name", "wg", "netns", self.web])
        self.ip(self.client, "addr", "add", f"{CLIENT}/24", "dev", "cg")
        self.ip(self.gateway, "addr", "add", f"{GATEWAY}/24", "dev", "gc")
        self.ip(self.gateway, "addr", "add", f"{GATEWAY_OUT}/24", "dev", "gw")
        for address in (WEB_BASE, *PATH_IPS.values()):
            self.ip(self.web, "addr", "add", f"{address}/24", "dev", "wg")
        for ns, dev in ((self.client, "cg"), (self.gateway, "gc"), (self.gateway, "gw"), (self.web, "wg")):
            self.ip(ns, "link", "set", dev, "up")
        self.ip(self.client, "route", "add", "198.51.100.0/24", "via", GATEWAY)
        self.ip(self.web, "route", "add", "192.0.2.0/24", "via", GATEWAY_OUT)
        self._tune()
        self._firewall()

    def _tune(self) -> None:
        # 1. Tens of thousands of short connections per run: a wide port range,
        #    TIME_WAIT reuse, and short-lived conntrack TIME_WAIT entries so the
        #    REDIRECT table never fills between repetitions.
        for ns in (self.client, self.gateway, self.web):
            self.sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65535")
            self.sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")
            self.sysctl(ns, "net.core.somaxconn", "8192")
            self.sysctl(ns, "net.ipv4.tcp_max_syn_backlog", "8192")
        # 2. The gateway routes, but its FORWARD chain lets only the direct
        #    path's address through: the proxied paths must go through dante.
        self.sysctl(self.gateway, "net.ipv4.ip_forward", "1")

    def _firewall(self) -> None:
        direct = PATH_IPS["direct"]
        rules = f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -s 192.0.2.0/24 -d {direct}/32 -j ACCEPT
-A FORWARD -s {direct}/32 -d 192.0.2.0/24 -j ACCEPT
COMMIT
"""
        run(self.argv(self.gateway, ["iptables-restore"]), input=rules.encode())
        nat = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
        for path, port in PROXY_PORTS.items():
            nat += f"-A OUTPUT -d {PATH_IPS[path]}/32 -p tcp -j REDIRECT --to-ports {port}\n"
        nat += "COMMIT\n"
        run(self.argv(self.client, ["iptables-restore"]), input=nat.encode())
        # The table exists now, so conntrack is live in the client namespace.
        self.sysctl(self.client, "net.netfilter.nf_conntrack_tcp_timeout_time_wait", "5")

    # -- helpers ---------------------------------------------------------------

    def argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def ip(self, ns: str, *args: str) -> None:
        run(["ip", "-n", ns, *args])

    def sysctl(self, ns: str, key: str, value: str) -> None:
        run(self.argv(ns, ["sysctl", "-q", "-w", f"{key}={value}"]))

    def file(self, name: str, text: str, mode: int = 0o644) -> Path:
        path = self.tmp / name
        path.write_text(text)
        path.chmod(mode)
        return path

    def spawn(self, ns: str, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              stdin: int | None = subprocess.DEVNULL, stdout: int | IO[bytes] | None = None,
              cwd: str | None = None) -> Spawned:
        """Start argv in ns, in its own process group; ``ip netns exec`` execs,
        so the PID recorded is the program's own."""
        log = self.tmp / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(self.argv(ns, argv), stdin=stdin,
                                     stdout=stdout if stdout is not None else out,
                                     stderr=out, env=env or clean_env(), cwd=cwd,
                                     start_new_session=True)
        spawned = Spawned(name, popen, log)
        self.processes.append(spawned)
        return spawned

    def wait_listening(self, ns: str, port: int, process: Spawned, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.alive():
                raise BenchError(f"{process.name} exited before listening on {port}:\n{process.output()}")
            out = run(self.argv(ns, ["ss", "-Hltn", f"sport = :{port}"]), check=False).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise BenchError(f"{process.name} did not listen on port {port} within {timeout:g}s:\n"
                         f"{process.output()}")

    def stop(self, p: Spawned, grace: float = 5) -> None:
        """Stop one process we started (SIGTERM, then SIGKILL) and forget it."""
        _kill_group(p.pid, signal.SIGTERM)
        try:
            p.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _kill_group(p.pid, signal.SIGKILL)
            p.popen.wait(timeout=grace)
        self.processes.remove(p)

    # -- teardown --------------------------------------------------------------

    def close(self) -> None:
        """Kill what we started, by PID, then anything left inside our namespaces."""
        for p in reversed(self.processes):
            _kill_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for p in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.05, deadline - time.monotonic()))
        for p in self.processes:
            _kill_group(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=2)
        for ns in self.namespaces:
            for _ in range(3):
                pids = run(["ip", "netns", "pids", ns], check=False, timeout=5).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.2)
            run(["ip", "netns", "del", ns], check=False, timeout=10)
        self.namespaces.clear()


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
