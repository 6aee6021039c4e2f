"""A three-namespace network lab for the root system tests.

    client  192.0.2.1/24     2001:db8:1::1/64   the daemon, the applications, REDIRECT rules
       |  veth
    gateway 192.0.2.2/24     2001:db8:1::2/64   the upstream proxies (forwarding OFF)
            198.51.100.1/24  2001:db8:2::1/64
       |  veth
    web     198.51.100.2/24  2001:db8:2::2/64   the destinations

Only RFC 5737 and 2001:db8::/32 addresses are used, and no namespace has a
default route, so nothing can leave the machine. Because the gateway does not
forward, a byte reaches the web namespace only through a proxy running there.

Namespace names carry a per-run prefix (``mp<pid>...``) because other people
run their own labs on the same machine at the same time. Everything the lab
starts is recorded by PID and killed by PID in ``close()``, which a fixture
calls unconditionally.

The module is reusable on its own: ``with Lab() as lab: ...`` builds the
network (optionally with iptables REDIRECT rules) and nothing else; peers.py
adds the proxies and servers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

SYSPATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Addresses of the lab. Nothing else is ever contacted.
CLIENT4, CLIENT6 = "192.0.2.1", "2001:db8:1::1"
GATEWAY4, GATEWAY6 = "192.0.2.2", "2001:db8:1::2"          # towards the client
GATEWAY_OUT4, GATEWAY_OUT6 = "198.51.100.1", "2001:db8:2::1"  # towards the web
WEB4, WEB6 = "198.51.100.2", "2001:db8:2::2"
WEB_NET4, WEB_NET6 = "198.51.100.0/24", "2001:db8:2::/64"
CLIENT_NET4, CLIENT_NET6 = "192.0.2.0/24", "2001:db8:1::/64"

NFT_TABLE = "lab_redirect"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class LabError(RuntimeError):
    """The lab could not be built or a helper process misbehaved."""


def run(argv: Sequence[str], *, timeout: float = 20, check: bool = True,
        input: bytes | None = None, env: dict[str, str] | None = None,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command with a timeout; on failure raise with its output."""
    proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                          env=env if env is not None else clean_env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                       f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}")
    return proc


def clean_env(**extra: str) -> dict[str, str]:
    """An environment with system PATH and no proxy variables."""
    env = {"PATH": SYSPATH, "LANG": "C.UTF-8", "HOME": "/nonexistent"}
    env.update(extra)
    return env


def url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


@dataclass
class Process:
    """A process the lab started; its log collects stdout and stderr."""
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int | None = None) -> str:
        """The log; only its last `tail` characters if given."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-tail:] if tail else text

    def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM its process group (its own, by PID), then SIGKILL after grace."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Children (dante's, nginx's workers) share the group; make sure they go too.
        _signal_group(self.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        return self.popen.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class Namespace:
    """One network namespace of the lab."""
    name: str
    lab: "Lab"

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return run(self.argv(argv), **kwargs)

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> Process:
        return self.lab.spawn(self, name, argv, **kwargs)

    def call(self, fn: Callable[[], T], timeout: float = 10) -> T:
        """Run fn in a thread that has entered this namespace.

        The network namespace is per thread (setns(2) with CLONE_NEWNET),
        so sockets fn creates belong to this namespace for their whole life,
        whichever thread uses them afterwards.
        """
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns into {self.name}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                box["value"] = fn()
            except BaseException as e:  # handed to the caller below
                box["error"] = e

        thread = threading.Thread(target=target, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise LabError(f"call in namespace {self.name} did not finish in {timeout}s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        return self.call(lambda: socket.socket(family, type))

    def connect(self, host: str, port: int, timeout: float = 5) -> socket.socket:
        """A TCP connection made from inside this namespace."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.socket(family)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_tcp(self, host: str, port: int, timeout: float = 10, process: Process | None = None) -> None:
        """Poll until something accepts on host:port (bounded in time and count)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        for _ in range(int(timeout / 0.05) + 1):
            if process is not None and not process.alive():
                raise LabError(f"{process.name} exited {process.popen.returncode} before listening "
                               f"on {host}:{port}:\n{process.output()}")
            try:
                self.connect(host, port, timeout=1).close()
                return
            except OSError as e:
                last = e
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        extra = f"\n{process.name} says:\n{process.output()}" if process else ""
        raise LabError(f"nothing listens on {host}:{port} in {self.name} after {timeout}s ({last}){extra}")


@dataclass
class Lab:
    """The client / gateway / web namespaces, their veths, and the processes started in them."""
    prefix: str = field(default_factory=lambda: f"mp{os.getpid()}")
    keep_tmp: bool = False  # close() leaves the temporary directory (logs, configs)
    tmp: Path = field(init=False)
    processes: list[Process] = field(default_factory=list, init=False)
    _namespaces: list[str] = field(default_factory=list, init=False)
    _cleanups: list[Callable[[], None]] = field(default_factory=list, init=False)
    redirect_port: tuple[int, str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.client = Namespace(f"{self.prefix}c", self)
        self.gateway = Namespace(f"{self.prefix}g", self)
        self.web = Namespace(f"{self.prefix}w", self)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-lab-"))
        # Peers and the daemon may run as nobody: they must reach their files and sockets.
        self.tmp.chmod(0o755)

    # ---- building -----------------------------------------------------------------

    def __enter__(self) -> "Lab":
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        for ns in (self.client, self.gateway, self.web):
            run(["ip", "netns", "add", ns.name])
            self._namespaces.append(ns.name)
            self._ip(ns, "link", "set", "lo", "up")
            # New namespaces never forward; say so anyway, the design relies on it.
            self._sysctl(ns, "net.ipv4.ip_forward", "0")
            self._sysctl(ns, "net.ipv6.conf.all.forwarding", "0")
            self._sysctl(ns, "net.ipv6.conf.default.accept_ra", "0")
        # Create each veth pair directly inside its two namespaces, so that the
        # short fixed names never meet anyone else's interfaces in the root namespace.
        run(["ip", "link", "add", "to-gw", "netns", self.client.name, "type", "veth",
             "peer", "name", "to-client", "netns", self.gateway.name])
        run(["ip", "link", "add", "to-web", "netns", self.gateway.name, "type", "veth",
             "peer", "name", "to-gw", "netns", self.web.name])
        self._address(self.client, "to-gw", f"{CLIENT4}/24", f"{CLIENT6}/64")
        self._address(self.gateway, "to-client", f"{GATEWAY4}/24", f"{GATEWAY6}/64")
        self._address(self.gateway, "to-web", f"{GATEWAY_OUT4}/24", f"{GATEWAY_OUT6}/64")
        self._address(self.web, "to-gw", f"{WEB4}/24", f"{WEB6}/64")
        self._ip(self.client, "route", "add", WEB_NET4, "via", GATEWAY4)
        self._ip(self.client, "-6", "route", "add", WEB_NET6, "via", GATEWAY6)
        self._ip(self.web, "route", "add", CLIENT_NET4, "via", GATEWAY_OUT4)
        self._ip(self.web, "-6", "route", "add", CLIENT_NET6, "via", GATEWAY_OUT6)

    def _ip(self, ns: Namespace, *args: str) -> None:
        run(["ip", "-n", ns.name, *args])

    def _sysctl(self, ns: Namespace, key: str, value: str) -> None:
        ns.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def _address(self, ns: Namespace, dev: str, v4: str, v6: str) -> None:
        self._sysctl(ns, f"net.ipv6.conf.{dev}.accept_ra", "0")
        self._ip(ns, "addr", "add", v4, "dev", dev)
        # nodad: the address is usable at once instead of after duplicate detection.
        self._ip(ns, "-6", "addr", "add", v6, "dev", dev, "nodad")
        self._ip(ns, "link", "set", dev, "up")

    # ---- REDIRECT rules in the client namespace -------------------------------------

    def redirect_to(self, port: int, backend: str = "iptables") -> None:
        """Send client TCP to the web networks to local port `port`.

        backend "iptables" adds iptables and ip6tables nat OUTPUT rules,
        "nftables" an ``inet`` table of our own. The daemon's own upstream
        connections go to the gateway's client-side addresses, which these
        rules do not match, so they never loop.
        """
        if self.redirect_port == (port, backend):
            return
        self.clear_redirect()
        if backend == "iptables":
            for tool, net in (("iptables", WEB_NET4), ("ip6tables", WEB_NET6)):
                self.client.run([tool, "-w", "5", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", net,
                                 "-j", "REDIRECT", "--to-ports", str(port)])
        elif backend == "nftables":
            self.client.run(["nft", "-f", "-"], input=f"""\
table inet {NFT_TABLE} {{
    chain output {{
        type nat hook output priority -100; policy accept;
        ip daddr {WEB_NET4} meta l4proto tcp redirect to :{port}
        ip6 daddr {WEB_NET6} meta l4proto tcp redirect to :{port}
    }}
}}
""".encode())
        else:
            raise ValueError(f"redirect backend: expected iptables or nftables, found {backend!r}")
        self.redirect_port = (port, backend)

    def clear_redirect(self) -> None:
        """Remove the rules redirect_to() added (only those)."""
        for tool in ("iptables", "ip6tables"):
            self.client.run([tool, "-w", "5", "-t", "nat", "-F", "OUTPUT"])
        self.client.run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)
        self.redirect_port = None

    # ---- processes ------------------------------------------------------------------

    def spawn(self, ns: Namespace | None, name: str, argv: Sequence[str], *,
              env: dict[str, str] | None = None, cwd: str | Path | None = None,
              log: Path | None = None, stdin: int | None = subprocess.DEVNULL,
              stdout: int | None = None) -> Process:
        """Start argv (in ns) in its own process group; record it for teardown.

        ``ip netns exec`` execs the command, so the PID we record is the
        program's own PID. stdout goes to the log unless given (e.g.
        subprocess.PIPE); stderr always does.
        """
        log = log or self.tmp / f"{name}.log"
        full = ns.argv(argv) if ns is not None else list(argv)
        with open(log, "ab") as out:
            popen = subprocess.Popen(full, stdin=stdin, stdout=out if stdout is None else stdout,
                                     stderr=subprocess.STDOUT if stdout is None else out,
                                     env=env if env is not None else clean_env(), cwd=cwd,
                                     start_new_session=True)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def on_close(self, fn: Callable[[], None]) -> None:
        """Register a cleanup that close() runs (last registered, first run)."""
        self._cleanups.append(fn)

    def file(self, name: str, text: str, mode: int = 0o644) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        return path

    # ---- teardown -------------------------------------------------------------------

    def close(self) -> None:
        """Kill what we started (by PID), delete our namespaces and files. Never raises."""
        errors: list[str] = []
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception as e:  # keep tearing down; report at the end
                errors.append(f"stop {process.name} (pid {process.pid}): {e}")
        self.processes.clear()
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception as e:
                errors.append(f"cleanup {fn}: {e}")
        for name in reversed(self._namespaces):
            try:
                run(["ip", "netns", "del", name], check=False)
            except Exception as e:
                errors.append(f"ip netns del {name}: {e}")
        self._namespaces.clear()
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            # Teardown must finish; leave a trace for the person reading the run.
            print("lab teardown problems:\n  " + "\n  ".join(errors))
