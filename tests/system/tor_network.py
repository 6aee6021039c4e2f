"""A private Tor network inside the lab, started and killed by the tests themselves.

Everything runs in the lab's gateway namespace with Debian's /usr/bin/tor, in
Tor's testing mode (``TestingTorNetwork 1``), so nothing ever leaves it:

    auth0..auth2  directory authorities (keys from tor-gencert), also relays
    relay0        a middle relay
    exit0         the only exit; its policy accepts EXIT_PORTS and rejects the rest
    hs            an onion service (v3) in front of the web server
    client        the Tor client the daemon uses:
                    SocksPort 192.0.2.2:9050 ExtendedErrors      (TCP)
                    SocksPort unix:<tmp>/run-tor/socks WorldWritable ExtendedErrors
                                 (laid out as Debian's /run/tor/socks: a 02755 directory)
                    DNSPort 192.0.2.2:53 with AutomapHostsOnResolve 1
                    ControlSocket with cookie authentication, ConfluxEnabled 0

The relays listen on 127.0.0.1 of the gateway namespace (its own loopback);
only the client's SOCKS and DNS ports are on the documentation address that
the client namespace reaches. The exit reaches the web namespace directly,
because it runs where the lab's web route is.

How the layout was chosen follows Tor's own chutney tool (authorities whose
v3 identity and relay fingerprint the DirAuthority lines name, short voting
intervals, the testing flags that let every relay be a guard, an HSDir and,
for the exit, an Exit). The code is ours.

Every tor runs in the foreground as a process the lab records by PID; stop()
kills exactly those.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tests.system.lab import GATEWAY4, Lab, LabError, Namespace, Process, run

TOR = "/usr/bin/tor"
TOR_GENCERT = "/usr/bin/tor-gencert"
SOCKS_PORT = 9050
DNS_PORT = 53
VIRTUAL_NET4 = "10.192.0.0/10"
# For the client's resolv.conf: nothing answers there; the daemon's strict rules
# ([firewall] dns) send the queries on to the client tor's DNSPort.
NOBODYS_RESOLVER = "192.0.2.53"
ONION_PORT = 80
AUTHORITIES = 3
RELAYS = 1
_OR_BASE, _DIR_BASE = 5100, 7100

# The ed25519 base point: a valid onion service key whose service nobody runs.
_UNUSED_ONION_KEY = bytes.fromhex("58" + "66" * 31)


def onion_address(pubkey: bytes) -> str:
    """The v3 onion address of an ed25519 public key (rend-spec-v3, "Encoding onion addresses")."""
    version = b"\x03"
    checksum = hashlib.sha3_256(b".onion checksum" + pubkey + version).digest()[:2]
    return base64.b32encode(pubkey + checksum + version).decode().lower() + ".onion"


MISSING_ONION = onion_address(_UNUSED_ONION_KEY)


class TorNetworkError(LabError):
    """The private Tor network did not come up; the message carries the tors' logs."""


@dataclass
class TorNode:
    name: str
    directory: Path
    torrc: Path
    process: Process | None = None

    def log(self, tail: int = 3000) -> str:
        return self.process.output(tail) if self.process else "(not started)"


# ---- torrc text ----------------------------------------------------------------------------

def _common(node: str, directory: Path, dir_authorities: str) -> str:
    # 1. TestingTorNetwork relaxes what a real network must enforce: private
    #    addresses, reachability learning time, distinct subnets.
    # 2. The Testing*Vote* lines make the authorities give every relay the flags
    #    a 6-relay network would otherwise never earn (Guard, HSDir, Exit).
    # 3. Short voting intervals give a first consensus within seconds.
    return f"""\
TestingTorNetwork 1
DataDirectory {directory}
Nickname {node}
RunAsDaemon 0
Log notice stdout
SafeLogging 0
LogTimeGranularity 1
ShutdownWaitLength 0
Sandbox 0
PathsNeededToBuildCircuits 0.67
TestingDirAuthVoteExit exit0
TestingDirAuthVoteGuard *
TestingDirAuthVoteHSDir *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 2
ConfluxEnabled 0
SocksPort 0
{dir_authorities}
"""


def _relay(index: int) -> str:
    return f"""\
Address 127.0.0.1
ORPort 127.0.0.1:{_OR_BASE + index}
AssumeReachable 1
ContactInfo lab-relay-{index}@example.org
"""


def _authority(index: int) -> str:
    return _relay(index) + f"""\
DirPort 127.0.0.1:{_DIR_BASE + index}
AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
TestingV3AuthInitialVotingInterval 10
TestingV3AuthInitialVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthVotingInterval 10
V3AuthVoteDelay 2
V3AuthDistDelay 2
ExitRelay 0
"""


def _exit(index: int, exit_ports: Iterable[str]) -> str:
    accepts = "\n".join(f"ExitPolicy accept *:{p}" for p in exit_ports)
    return _relay(index) + f"""\
ExitRelay 1
{accepts}
ExitPolicy reject *:*
"""


@dataclass
class TorNetwork:
    """The network's nodes and the client's ports; ``start()`` waits until it works."""
    lab: Lab
    ns: Namespace
    web_address: str
    onion_target_port: int
    exit_ports: tuple[str, ...]  # ExitPolicy port specs: "8000-8999", "80"
    root: Path = field(init=False)
    nodes: dict[str, TorNode] = field(default_factory=dict, init=False)
    onion: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.root = self.lab.tmp / "tor"
        self.root.mkdir(mode=0o700, exist_ok=True)
        # Debian's /run/tor: root (debian-tor there), 02755, the socket WorldWritable in it.
        self.run_dir = self.lab.tmp / "run-tor"
        self.run_dir.mkdir(exist_ok=True)
        os.chmod(self.run_dir, 0o2755)
        self.unix_socket = self.run_dir / "socks"
        self.socks = (GATEWAY4, SOCKS_PORT)
        self.dns = (GATEWAY4, DNS_PORT)

    # ---- layout ------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        directory = self.root / name
        directory.mkdir(mode=0o700, exist_ok=True)
        return directory

    def _make_authority_keys(self, index: int) -> str:
        """tor-gencert keys and the DirAuthority line of authority ``index``."""
        name = f"auth{index}"
        directory = self._dir(name)
        keys = directory / "keys"
        keys.mkdir(mode=0o700, exist_ok=True)
        run([TOR_GENCERT, "--create-identity-key", "-m", "12", "-a", f"127.0.0.1:{_DIR_BASE + index}",
             "-i", str(keys / "authority_identity_key"), "-s", str(keys / "authority_signing_key"),
             "-c", str(keys / "authority_certificate"), "--passphrase-fd", "0"], input=b"\n")
        cert = (keys / "authority_certificate").read_text()
        match = re.search(r"^fingerprint ([0-9A-F]{40})$", cert, re.M)
        if not match:
            raise TorNetworkError(f"tor-gencert wrote no fingerprint into {keys}/authority_certificate")
        v3ident = match.group(1)
        # --list-fingerprint creates the relay identity key and prints its fingerprint.
        run([TOR, "--list-fingerprint", "--ignore-missing-torrc", "-f", "/dev/null",
             "--DataDirectory", str(directory), "--ORPort", str(_OR_BASE + index),
             "--Nickname", name, "--TestingTorNetwork", "1",
             "--DirAuthority", f"dummy 127.0.0.1:1 {'0' * 40}"], timeout=30)
        fingerprint = (directory / "fingerprint").read_text().split()[1]
        return (f"DirAuthority {name} orport={_OR_BASE + index} no-v2 v3ident={v3ident} "
                f"127.0.0.1:{_DIR_BASE + index} {fingerprint}")

    def _client_torrc(self) -> str:
        # SocksPort flags: ExtendedErrors (0xF0-0xF7 replies); IsolateSOCKSAuth is on by default.
        return f"""\
SocksPort {GATEWAY4}:{SOCKS_PORT} ExtendedErrors
SocksPort unix:{self.unix_socket} WorldWritable ExtendedErrors
DNSPort {GATEWAY4}:{DNS_PORT}
AutomapHostsOnResolve 1
VirtualAddrNetworkIPv4 {VIRTUAL_NET4}
ControlSocket {self.root / 'client' / 'control'}
CookieAuthentication 1
SocksTimeout 60
"""

    def write(self) -> None:
        lines = [self._make_authority_keys(i) for i in range(AUTHORITIES)]
        dir_authorities = "\n".join(lines)
        bodies: dict[str, str] = {f"auth{i}": _authority(i) for i in range(AUTHORITIES)}
        for r in range(RELAYS):
            bodies[f"relay{r}"] = _relay(AUTHORITIES + r) + "ExitRelay 0\n"
        bodies["exit0"] = _exit(AUTHORITIES + RELAYS, self.exit_ports)
        hs_dir = self._dir("hs") / "service"
        hs_dir.mkdir(mode=0o700, exist_ok=True)
        bodies["hs"] = (f"HiddenServiceDir {hs_dir}\n"
                        f"HiddenServicePort {ONION_PORT} {self.web_address}:{self.onion_target_port}\n")
        # The control socket's directory must be private: the client's DataDirectory is.
        bodies["client"] = self._client_torrc()
        for name, body in bodies.items():
            directory = self._dir(name)
            torrc = directory / "torrc"
            # `SocksPort 0` in the common part is overridden by the client's lines: Tor
            # takes all lines of a list option from the last place that sets it.
            common = _common(name, directory, dir_authorities)
            if name == "client":
                common = common.replace("SocksPort 0\n", "")
            torrc.write_text(common + body)
            self.nodes[name] = TorNode(name, directory, torrc)

    # ---- running -----------------------------------------------------------------------

    def start_node(self, name: str) -> None:
        node = self.nodes[name]
        node.process = self.ns.spawn(f"tor-{name}", [TOR, "-f", str(node.torrc)],
                                     log=node.directory / "tor.log")

    def start(self, timeout: float = 120) -> "TorNetwork":
        """Start every node and wait (bounded) until the client has bootstrapped,
        an exit stream works and the onion service answers."""
        for exe in (TOR, TOR_GENCERT):
            if not Path(exe).exists():
                raise TorNetworkError(f"{exe} is missing (Debian package tor; see .ci/apt-packages)")
        self.write()
        for name in self.nodes:
            self.start_node(name)
        deadline = time.monotonic() + timeout
        self.wait_client(deadline)
        hostname = self.nodes["hs"].directory / "service" / "hostname"
        self._until(deadline, lambda: hostname.exists(), "the onion service to write its hostname")
        self.onion = hostname.read_text().strip()
        self._until(deadline, lambda: self.probe(self.web_address, self.onion_target_port) == 0,
                    "a stream through the exit")
        self._until(deadline, lambda: self.probe(self.onion, ONION_PORT, timeout=20) == 0,
                    "the onion service to answer", pause=1.0)
        return self

    def wait_client(self, deadline: float) -> None:
        def done() -> bool:
            try:
                return "PROGRESS=100" in self.control().getinfo("status/bootstrap-phase")
            except OSError:
                return False
        self._until(deadline, done, "the client to bootstrap")

    def _until(self, deadline: float, ready: Callable[[], bool], what: str, pause: float = 0.5) -> None:
        while True:
            for node in self.nodes.values():
                if node.process is not None and not node.process.alive():
                    raise TorNetworkError(f"tor {node.name} exited {node.process.popen.returncode} "
                                          f"while waiting for {what}:\n{node.log()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise TorNetworkError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(pause)

    def logs(self, tail: int = 2500) -> str:
        return "\n".join(f"---- tor {n.name} ----\n{n.log(tail)}" for n in self.nodes.values())

    def restart_client(self, timeout: float = 60) -> None:
        """Stop the client tor (by its PID) and start it again on the same DataDirectory."""
        node = self.nodes["client"]
        if node.process is not None:
            node.process.stop()
        self.start_node("client")
        self.wait_client(time.monotonic() + timeout)

    def stop_client(self) -> None:
        node = self.nodes["client"]
        if node.process is not None:
            node.process.stop()

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            if node.process is not None:
                node.process.stop()

    # ---- talking to the client ---------------------------------------------------------

    def control(self) -> "TorControl":
        client = self.nodes["client"].directory
        return TorControl(client / "control", client / "control_auth_cookie")

    def probe(self, host: str, port: int, timeout: float = 10) -> int:
        """SOCKS5 CONNECT through the client's TCP SocksPort, from the gateway namespace.

        Returns the reply code (0 is success, -1 no reply)."""
        def attempt() -> int:
            with socket.create_connection(self.socks, timeout=timeout) as sock:
                return socks5_connect(sock, host, port)
        try:
            return self.ns.call(attempt, timeout=timeout + 5)
        except (OSError, LabError):
            return -1


def socks5_connect(sock: socket.socket, host: str, port: int, username: str = "") -> int:
    """A minimal SOCKS5 CONNECT by name or IPv4; returns the reply code."""
    if username:
        sock.sendall(b"\x05\x01\x02")
        if sock.recv(2) != b"\x05\x02":
            return -1
        u = username.encode()
        sock.sendall(b"\x01" + bytes([len(u)]) + u + b"\x01x")
        if sock.recv(2)[1:] != b"\x00":
            return -1
    else:
        sock.sendall(b"\x05\x01\x00")
        if sock.recv(2) != b"\x05\x00":
            return -1
    try:
        address = b"\x01" + socket.inet_aton(host)
    except OSError:
        address = b"\x03" + bytes([len(host)]) + host.encode()
    sock.sendall(b"\x05\x01\x00" + address + port.to_bytes(2, "big"))
    reply = sock.recv(4)
    return reply[1] if len(reply) >= 2 else -1


# ---- the control port ------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamEvent:
    stream: str
    status: str
    circuit: str
    target: str
    username: str | None
    reason: str | None
    when: float


_KEYWORD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_stream_event(line: str, when: float) -> StreamEvent | None:
    """``650 STREAM <id> <status> <circ> <target> [KEY=VALUE ...]`` (control-spec 4.1.2)."""
    parts = line.split(" ", 6)
    if len(parts) < 6 or parts[1] != "STREAM":
        return None
    extra = {k: v.strip('"') for k, v in _KEYWORD.findall(parts[6] if len(parts) > 6 else "")}
    return StreamEvent(parts[2], parts[3], parts[4], parts[5], extra.get("SOCKS_USERNAME"),
                       _reason(extra), when)


def _reason(extra: dict[str, str]) -> str | None:
    """REASON, with the exit's REMOTE_REASON after a slash when the far end gave one."""
    if "REMOTE_REASON" in extra:
        return f"{extra.get('REASON')}/{extra['REMOTE_REASON']}"
    return extra.get("REASON")


class TorControl:
    """One control connection over the client's ControlSocket, authenticated with its cookie."""

    def __init__(self, path: Path, cookie: Path, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            self.file = self.sock.makefile("rb")
            reply = self.command(f"AUTHENTICATE {cookie.read_bytes().hex()}")
        except BaseException:
            self.sock.close()
            raise
        if reply[-1] != "250 OK":
            self.close()
            raise OSError(f"tor control AUTHENTICATE refused: {reply}")

    def command(self, text: str) -> list[str]:
        self.sock.sendall(text.encode() + b"\r\n")
        return self._reply()

    def _reply(self) -> list[str]:
        lines: list[str] = []
        while True:
            raw = self.file.readline()
            if not raw:
                raise ConnectionError("tor closed the control connection")
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.startswith("650"):
                continue  # an async event between replies; events have their own connection
            lines.append(line)
            if len(line) >= 4 and line[3] == " ":
                return lines
            if len(line) >= 4 and line[3] == "+":  # data follows until "."
                while True:
                    data = self.file.readline().decode(errors="replace").rstrip("\r\n")
                    if data == ".":
                        break
                    lines.append(data)

    def getinfo(self, key: str) -> str:
        lines = self.command(f"GETINFO {key}")
        if not lines[-1].startswith("250"):
            raise OSError(f"GETINFO {key}: {lines}")
        return "\n".join(lines)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "TorControl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamWatch:
    """Records the client's STREAM and CIRC events from a control connection of its own."""

    def __init__(self, network: TorNetwork) -> None:
        self.control = network.control()
        self.streams: list[StreamEvent] = []
        self.circuits_built: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self.control.command("SETEVENTS STREAM CIRC")
        self.control.sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, name="tor-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                raw = self.control.file.readline()
            except (OSError, ValueError):
                return
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\r\n")
            now = time.monotonic()
            with self._lock:
                event = parse_stream_event(line, now)
                if event is not None:
                    self.streams.append(event)
                elif line.startswith("650 CIRC ") and line.split(" ")[3] == "BUILT":
                    self.circuits_built.append((line.split(" ")[2], now))

    def mark(self) -> tuple[int, int]:
        with self._lock:
            return len(self.streams), len(self.circuits_built)

    def succeeded(self, mark: tuple[int, int], count: int, timeout: float = 10) -> list[StreamEvent]:
        """The SUCCEEDED streams since mark, waiting (bounded) until ``count`` are there."""
        return self.with_status(mark, "SUCCEEDED", count, timeout)

    def with_status(self, mark: tuple[int, int], status: str, count: int,
                    timeout: float = 10) -> list[StreamEvent]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [e for e in self.streams[mark[0]:] if e.status == status]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def built_since(self, mark: tuple[int, int]) -> int:
        with self._lock:
            return len(self.circuits_built) - mark[1]

    def close(self) -> None:
        self.control.close()


def tor_available() -> str | None:
    """None if Debian's tor is installed, otherwise why not."""
    missing = [exe for exe in (TOR, TOR_GENCERT) if shutil.which(exe) is None]
    return f"missing programs: {', '.join(missing)} (Debian package tor; `make deps`)" if missing else None
