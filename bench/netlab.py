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

Net is the system tests' Lab (tests/system/lab.py) with this topology
instead of the test lab's: the namespaces, process handling (own process
group, stop by PID), run() and clean_env() are the lab's. Everything is named
per run (``mpb<pid>c`` ...) and every process is recorded by PID; ``close()``
kills those PIDs (and any process still inside our own namespaces) and
deletes the namespaces, whatever happened before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.system.lab import PYTHON, Lab, LabError, Namespace, Process, clean_env, run  # noqa: E402

__all__ = ["PYTHON", "BenchError", "Net", "Process", "clean_env", "run"]

CLIENT, GATEWAY, GATEWAY_OUT = "192.0.2.1", "192.0.2.2", "198.51.100.1"
WEB_BASE = "198.51.100.2"
PATH_IPS = {"project": "198.51.100.10", "redsocks": "198.51.100.11", "direct": "198.51.100.12"}
PROXY_PORTS = {"project": 8675, "redsocks": 12345}


class BenchError(LabError):
    """The bench could not build its network or a helper misbehaved."""


@dataclass
class Net(Lab):
    prefix: str = field(default_factory=lambda: f"mpb{os.getpid()}")

    # -- building --------------------------------------------------------------

    def build(self) -> None:
        self.on_close(self._kill_leftovers)
        for ns in (self.client, self.gateway, self.web):
            run(["ip", "netns", "add", ns.name])
            self._namespaces.append(ns.name)
            self._ip(ns, "link", "set", "lo", "up")
        run(["ip", "-n", self.client.name, "link", "add", "cg", "type", "veth",
             "peer", "name", "gc", "netns", self.gateway.name])
        run(["ip", "-n", self.gateway.name, "link", "add", "gw", "type", "veth",
             "peer", "name", "wg", "netns", self.web.name])
        self._ip(self.client, "addr", "add", f"{CLIENT}/24", "dev", "cg")
        self._ip(self.gateway, "addr", "add", f"{GATEWAY}/24", "dev", "gc")
        self._ip(self.gateway, "addr", "add", f"{GATEWAY_OUT}/24", "dev", "gw")
        for address in (WEB_BASE, *PATH_IPS.values()):
            self._ip(self.web, "addr", "add", f"{address}/24", "dev", "wg")
        for ns, dev in ((self.client, "cg"), (self.gateway, "gc"), (self.gateway, "gw"), (self.web, "wg")):
            self._ip(ns, "link", "set", dev, "up")
        self._ip(self.client, "route", "add", "198.51.100.0/24", "via", GATEWAY)
        self._ip(self.web, "route", "add", "192.0.2.0/24", "via", GATEWAY_OUT)
        self._tune()
        self._firewall()

    def _tune(self) -> None:
        # 1. Tens of thousands of short connections per run: a wide port range,
        #    TIME_WAIT reuse, and short-lived conntrack TIME_WAIT entries so the
        #    REDIRECT table never fills between repetitions.
        for ns in (self.client, self.gateway, self.web):
            self._sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65535")
            self._sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")
            self._sysctl(ns, "net.core.somaxconn", "8192")
            self._sysctl(ns, "net.ipv4.tcp_max_syn_backlog", "8192")
        # 2. The gateway routes, but its FORWARD chain lets only the direct
        #    path's address through: the proxied paths must go through dante.
        self._sysctl(self.gateway, "net.ipv4.ip_forward", "1")

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
        self.gateway.run(["iptables-restore"], input=rules.encode())
        nat = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
        for path, port in PROXY_PORTS.items():
            nat += f"-A OUTPUT -d {PATH_IPS[path]}/32 -p tcp -j REDIRECT --to-ports {port}\n"
        nat += "COMMIT\n"
        self.client.run(["iptables-restore"], input=nat.encode())
        # The table exists now, so conntrack is live in the client namespace.
        self._sysctl(self.client, "net.netfilter.nf_conntrack_tcp_timeout_time_wait", "5")

    # -- processes -------------------------------------------------------------

    def wait_listening(self, ns: Namespace, port: int, process: Process, timeout: float = 15) -> None:
        """Poll ss until something listens on port; never connects (a probe would
        reach the proxies unredirected, and count in their figures)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.alive():
                raise BenchError(f"{process.name} exited before listening on {port}:\n{process.output(2000)}")
            if ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
                return
            time.sleep(0.05)
        raise BenchError(f"{process.name} did not listen on port {port} within {timeout:g}s:\n"
                         f"{process.output(2000)}")

    def stop(self, p: Process, grace: float = 5) -> None:
        """Stop one process we started (the lab's stop by PID) and forget it."""
        p.stop(grace)
        self.processes.remove(p)

    # -- teardown --------------------------------------------------------------

    def _kill_leftovers(self) -> None:
        """After the lab has stopped our PIDs: anything still inside our namespaces."""
        for ns in self._namespaces:
            for _ in range(3):
                pids = run(["ip", "netns", "pids", ns], check=False, timeout=5).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.2)
