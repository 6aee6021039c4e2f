"""SIGHUP, SIGTERM and SIGUSR1 on a real daemon in the lab: reload, drain, counters.

The daemon gets a NOTIFY_SOCKET that the test binds (an AF_UNIX datagram
socket in the lab directory), so the tests also see what it tells systemd:
READY=1 with STATUS=, RELOADING=1, STOPPING=1.

The destination is the web namespace's sink (servers.py sink): it reads to
EOF and answers with the sha256 and length of what it got. A connection that
carries bytes before and after an event and then gets the right digest has
survived the event in both directions.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.system import clients, peers
from tests.system.daemon import NOBODY, UNPRIVILEGED, Daemon, daemon_section, metaproxy_argv, next_port
from tests.system.lab import GATEWAY4, REPO, WEB4, Lab, clean_env
from tests.system.peers import World

SINK = peers.SINK_PORT
LOAD = 200                       # relayed connections held open across a reload
NEWLY_ROUTED = 8007              # nginx listens here (topology.HTTP_PORTS); unrouted at first
DRAIN = 4.0                      # drain_timeout of the SIGTERM test, seconds
BIG_PORT = 8001                  # nginx serves big.bin (50 MB) here too


def config(port: int, routes: dict[int, str], **daemon: object) -> str:
    # The tests follow connections by their open and close lines, which are off by default.
    daemon.setdefault("log_connections", "yes")
    return daemon_section(port, connect_timeout=5, **daemon) + f"""\
[upstreams]
    [[a]]
    type = socks5
    address = {GATEWAY4}:{peers.DANTE_PORT}
    [[b]]
    type = socks5
    address = {GATEWAY4}:{peers.MICROSOCKS_PORT}
    isolation = none
    [[down]]
    type = socks5
    address = {GATEWAY4}:{peers.DOWN_UPSTREAM_PORT}
[routes]
""" + "".join(f"{p} = {name}\n" for p, name in routes.items())


# ---- sd_notify, seen from systemd's side -----------------------------------------------

class NotifySocket:
    """What systemd would receive on NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o666)  # the daemon sends after dropping to nobody
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def collect(self) -> list[str]:
        for _ in range(10_000):
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                break
        return self.messages

    def wait_for(self, prefix: str, timeout: float = 10) -> str:
        for _ in range(int(timeout / 0.05) + 1):
            found = [m for m in self.collect() if m.startswith(prefix)]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} on NOTIFY_SOCKET after {timeout}s: {self.messages}")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Notified:
    daemon: Daemon
    notify: NotifySocket
    config_path: Path
    port: int
    pid: int = field(init=False)

    def __post_init__(self) -> None:
        assert self.daemon.process is not None
        self.pid = self.daemon.process.pid

    def rewrite(self, text: str) -> None:
        self.config_path.write_text(text)

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)


@pytest.fixture
def notified_daemon(world: World) -> Iterator[Callable[..., Notified]]:
    """start(config_for_port, **env) -> a daemon with our NOTIFY_SOCKET; REDIRECT points at it."""
    started: list[Notified] = []

    def start(config_for_port: Callable[[int], str], **env: str) -> Notified:
        port = next_port()
        name = f"metaproxy-signals-{port}"
        path = world.lab.file(f"{name}.conf", config_for_port(port))
        notify = NotifySocket(world.lab.tmp / f"notify-{port}.sock")
        daemon = Daemon(world.lab, name, path, port, (), UNPRIVILEGED)
        argv = metaproxy_argv(["-c", str(path), "--log-target", "stderr"])
        if UNPRIVILEGED:
            argv = NOBODY + argv + ["--unprivileged"]
        daemon.process = world.lab.client.spawn(name, argv, cwd=REPO, env=clean_env(
            PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", NOTIFY_SOCKET=str(notify.path), **env))
        handle = Notified(daemon, notify, path, port)
        started.append(handle)
        daemon._wait_listening(15)
        notify.wait_for("READY=1")
        world.lab.redirect_to(port)
        return handle

    try:
        yield start
    finally:
        for handle in started:
            handle.daemon.stop()
            handle.notify.close()


def assert_reload_notified(notify: NotifySocket) -> str:
    """RELOADING=1, then READY=1 again once the new table is in use; returns the latter."""
    notify.wait_for("RELOADING=1")
    for _ in range(100):
        messages = notify.collect()
        first = next(i for i, m in enumerate(messages) if m.startswith("RELOADING=1"))
        ready = [m for m in messages[first + 1:] if m.startswith("READY=1")]
        if ready:
            return ready[0]
        time.sleep(0.05)
    raise AssertionError(f"no READY=1 after RELOADING=1: {notify.messages}")


# ---- sink connections ---------------------------------------------------------------------

@dataclass
class SinkStream:
    """One client connection to the sink, remembering everything it sent."""
    sock: socket.socket
    sent: bytes = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += data

    def finish(self) -> bytes:
        """Half-close, then read the sink's answer to EOF."""
        self.sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := self.sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)

    def expected(self) -> bytes:
        return f"{hashlib.sha256(self.sent).hexdigest()} {len(self.sent)}\n".encode()

    def close(self) -> None:
        self.sock.close()


def open_streams(lab: Lab, count: int, tag: str) -> list[SinkStream]:
    """count connections to the sink, opened in the client namespace (redirected)."""
    def connect_all() -> list[socket.socket]:
        made: list[socket.socket] = []
        try:
            for _ in range(count):
                made.append(socket.create_connection((WEB4, SINK), timeout=10))
        except BaseException:
            for sock in made:
                sock.close()
            raise
        return made
    streams = [SinkStream(sock) for sock in lab.client.call(connect_all, timeout=60)]
    for i, stream in enumerate(streams):
        stream.send(f"{tag} {i} before\n".encode())
    return streams


def wait_opened(daemon: Daemon, upstream: str, count: int, since: int = 0, timeout: float = 30) -> None:
    needle = f" open via {upstream} "
    for _ in range(int(timeout / 0.1) + 1):
        if daemon.log_since(since).count(needle) >= count:
            return
        if not daemon.alive():
            break
        time.sleep(0.1)
    log = daemon.log_since(since)
    raise AssertionError(f"{log.count(needle)} of {count} connections opened via {upstream}:\n{log[-3000:]}")


# ---- SIGHUP -------------------------------------------------------------------------------

def test_reload_under_load_keeps_open_connections_and_new_ones_take_the_new_routes(
        world: World, notified_daemon: Callable[..., Notified]) -> None:
    """200 relayed connections stay up through a SIGHUP that re-routes their port; after
    it, new connections to that port take the new (down) upstream and are reset, and a
    port that had no route is relayed through the upstream it now has."""
    handle = notified_daemon(lambda port: config(port, {SINK: "a"}))
    daemon = handle.daemon
    assert clients.exchange(world.client, WEB4, NEWLY_ROUTED, b"GET / HTTP/1.0\r\n\r\n").reset

    streams = open_streams(world.lab, LOAD, "load")
    try:
        wait_opened(daemon, "a", LOAD)
        mark = daemon.mark()
        handle.rewrite(config(handle.port, {SINK: "down", NEWLY_ROUTED: "b"}))
        handle.signal(signal.SIGHUP)
        assert "reloaded routes and upstreams" in daemon.wait_log("reloaded routes and upstreams", mark)
        ready = assert_reload_notified(handle.notify)
        assert ready.startswith(f"READY=1\nSTATUS={LOAD} open, {LOAD + 1} total, 1 refused"), ready

        # New connections follow the new table.
        moved = clients.exchange(world.client, WEB4, SINK, b"new", half_close=True)
        assert moved.reset and moved.data == b"", moved
        fetched = clients.curl(world.client, clients.url(WEB4, NEWLY_ROUTED))
        assert fetched.ok and fetched.body == peers.INDEX.encode(), fetched.stderr
        wait_opened(daemon, "b", 1, since=mark)

        # The old ones still carry bytes both ways, through the old upstream.
        assert " close (" not in daemon.log_since(mark).split("reloaded routes")[0]
        failures = []
        for i, stream in enumerate(streams):
            stream.send(f"load {i} after\n".encode())
        for i, stream in enumerate(streams):
            try:
                answer = stream.finish()
            except OSError as e:
                answer = repr(e).encode()
            if answer != stream.expected():
                failures.append(f"connection {i}: {answer!r}")
        assert not failures, f"{len(failures)} of {LOAD} connections broke:\n" + "\n".join(failures[:10])
        assert daemon.alive()
    finally:
        for stream in streams:
            stream.close()


def test_reload_keeps_listeners_user_and_sandbox_and_says_they_need_a_restart(
        world: World, notified_daemon: Callable[..., Notified]) -> None:
    """Changing listen, port, user and seccomp in the file and sending SIGHUP changes
    none of them; the log names the keys and says a restart is needed."""
    handle = notified_daemon(lambda port: config(port, {SINK: "a"}))
    daemon = handle.daemon
    before = _identity(handle.pid)
    mark = daemon.mark()
    text = config(handle.port + 1000, {SINK: "a"}).replace("listen = 127.0.0.1, ::1", "listen = 127.0.0.1")
    text = text.replace("user = nobody", "user = daemon")
    text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("seccomp ="))
    text = text.replace("[upstreams]", "seccomp = off\n[upstreams]")
    handle.rewrite(text)
    handle.signal(signal.SIGHUP)
    log = daemon.wait_log("reloaded routes and upstreams", mark)
    assert "[daemon] listen, port, user, seccomp changed; that takes a restart" in log, log
    daemon._wait_listening(2)  # the old port, on IPv4 and IPv6
    assert _identity(handle.pid) == before
    assert "Uid:\t65534\t65534\t65534\t65534" in before[0], before  # still nobody
    stream, = open_streams(world.lab, 1, "after-reload")
    try:
        assert stream.finish() == stream.expected()
    finally:
        stream.close()


def _identity(pid: int) -> tuple[str, ...]:
    """The uid, gid and sandbox lines of /proc/PID/status."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return tuple(line for line in lines if line.split(":")[0] in
                 ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp"))


def test_reload_of_a_broken_file_keeps_the_running_configuration(
        world: World, notified_daemon: Callable[..., Notified]) -> None:
    """A SIGHUP with a config that does not load logs the problem, keeps the old routes,
    and still tells systemd READY=1 (never leaves it waiting in "reloading")."""
    handle = notified_daemon(lambda port: config(port, {SINK: "a"}))
    daemon = handle.daemon
    mark = daemon.mark()
    handle.rewrite("[daemon]\nport = not-a-port\n")
    handle.signal(signal.SIGHUP)
    log = daemon.wait_log("keeping the running configuration", mark)
    assert "reload of" in log and "keeping the running configuration" in log, log
    assert_reload_notified(handle.notify)
    stream, = open_streams(world.lab, 1, "after-bad-reload")
    try:
        assert stream.finish() == stream.expected()
    finally:
        stream.close()


# ---- SIGTERM ------------------------------------------------------------------------------

def late_connection(world: World) -> clients.Outcome:
    """A sink connection made during a drain: refused (RST to the SYN) or reset."""
    started = time.monotonic()
    try:
        return clients.exchange(world.client, WEB4, SINK, b"late", half_close=True, timeout=DRAIN + 5)
    except ConnectionRefusedError:
        return clients.Outcome(b"", True, time.monotonic() - started, "connection refused")


def test_sigterm_lets_transfers_finish_within_the_drain_time_then_resets_the_rest(
        world: World, notified_daemon: Callable[..., Notified]) -> None:
    """After SIGTERM the daemon says STOPPING=1 and refuses new connections; transfers
    in flight (a 50 MB download, uploads that keep sending) complete correctly within
    drain_timeout; the connections still open then are reset; the process exits 0."""
    handle = notified_daemon(lambda port: config(port, {SINK: "a", BIG_PORT: "a"},
                                                 drain_timeout=int(DRAIN)))
    daemon = handle.daemon
    finishing = open_streams(world.lab, 5, "finishing")
    lingering = open_streams(world.lab, 5, "lingering")
    download: list[subprocess.CompletedProcess[bytes]] = []
    big = world.lab.tmp / f"big-{handle.port}.bin"
    threads: list[threading.Thread] = []
    try:
        wait_opened(daemon, "a", 10)
        threads.append(_background(lambda: download.append(world.client.run(
            ["curl", "-q", "--silent", "--show-error", "--fail", "--limit-rate", "25M", "--max-time",
             str(int(DRAIN + 10)), "--output", str(big), clients.url(WEB4, BIG_PORT, "/big.bin")],
            check=False, timeout=DRAIN + 15)), "download"))
        wait_opened(daemon, "a", 11)
        uploads_end = time.monotonic() + 1.5
        threads.append(_background(lambda: _trickle(finishing, uploads_end), "uploads"))
        time.sleep(0.4)  # the download and the uploads are under way

        mark = daemon.mark()
        started = time.monotonic()
        handle.signal(signal.SIGTERM)
        assert not download, "the download ended before SIGTERM: nothing was in flight"
        assert handle.notify.wait_for("STOPPING=1", timeout=2)

        # The listeners are closed: a connection redirected now is refused at once.
        late = late_connection(world)
        assert late.reset and late.data == b"" and late.seconds < 1, late

        # Transfers in flight go on during the drain and end normally.
        for thread in threads:
            thread.join(DRAIN + 20)
        for i, stream in enumerate(finishing):
            assert stream.finish() == stream.expected(), f"finishing connection {i}"
        got, = download
        assert got.returncode == 0, got.stderr.decode(errors="replace")
        assert _sha256(big) == world.web.big_sha256, "the download was cut short or corrupted"
        finished = time.monotonic() - started
        assert finished < DRAIN, f"the transfers took {finished:.2f}s, longer than the drain"

        # The rest are reset once the drain time is over.
        for i, stream in enumerate(lingering):
            stream.sock.settimeout(DRAIN + 5)
            with pytest.raises(ConnectionResetError):
                stream.sock.recv(4096)
            waited = time.monotonic() - started
            assert DRAIN - 0.5 <= waited <= DRAIN + 2, f"lingering connection {i} reset after {waited:.2f}s"

        assert daemon.process is not None
        code = daemon.process.popen.wait(timeout=10)
        assert code == 0, daemon.log_since(mark)
        log = daemon.log_since(mark)
        assert "draining 11 connections" in log and "stopped:" in log, log
        assert log.count("shutdown: drain time over") == 5, log
        messages = handle.notify.collect()
        assert messages[0].startswith("READY=1\nSTATUS=")
        assert any(m.startswith("STOPPING=1") for m in messages), messages
    finally:
        for stream in finishing + lingering:
            stream.close()
        for thread in threads:
            thread.join(DRAIN + 20)
        big.unlink(missing_ok=True)


def _background(fn: Callable[[], object], name: str) -> threading.Thread:
    thread = threading.Thread(target=fn, name=name, daemon=True)
    thread.start()
    return thread


def _trickle(streams: list[SinkStream], until: float) -> None:
    """Keep every stream sending a little, every 20 ms, until the given time."""
    for n in range(1000):
        if time.monotonic() >= until:
            return
        for stream in streams:
            stream.send(f"chunk {n}\n".encode() * 20)
        time.sleep(0.02)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_sigterm_exits_as_soon_as_the_last_transfer_ends(
        world: World, notified_daemon: Callable[..., Notified]) -> None:
    """With a long drain_timeout, the daemon exits 0 right after its last open
    connection closes instead of waiting out the drain time."""
    handle = notified_daemon(lambda port: config(port, {SINK: "a"}, drain_timeout=30))
    daemon = handle.daemon
    streams = open_streams(world.lab, 3, "quick")
    try:
        wait_opened(daemon, "a", 3)
        started = time.monotonic()
        handle.signal(signal.SIGTERM)
        handle.notify.wait_for("STOPPING=1", timeout=2)
        for stream in streams:
            assert stream.finish() == stream.expected()
        assert daemon.process is not None
        assert daemon.process.popen.wait(timeout=10) == 0, daemon.log()
        assert time.monotonic() - started < 5, "the daemon waited for the drain time with nothing open"
    finally:
        for stream in streams:
            stream.close()


# ---- SIGUSR1 ------------------------------------------------------------------------------

def test_sigusr1_logs_the_counters(world: World, notified_daemon: Callable[..., Notified]) -> None:
    """SIGUSR1 logs open, total, refused and failed connections and the bytes each way,
    and the daemon carries on."""
    handle = notified_daemon(lambda port: config(port, {SINK: "a", peers.SILENT_PORT: "down"}))
    daemon = handle.daemon
    stream, = open_streams(world.lab, 1, "counted")
    try:
        assert stream.finish() == stream.expected()
    finally:
        stream.close()
    assert clients.exchange(world.client, WEB4, peers.SILENT_PORT, b"x").reset       # upstream down
    assert clients.exchange(world.client, WEB4, NEWLY_ROUTED, b"x").reset            # no route
    mark = daemon.mark()
    for _ in range(50):  # the close of the sink connection may still be on its way
        if "close (" in daemon.log():
            break
        time.sleep(0.1)
    handle.signal(signal.SIGUSR1)
    log = daemon.wait_log("counters:", mark)
    line = next(line for line in log.splitlines() if "counters:" in line)
    assert "0 open, 3 total, 1 refused, 1 upstream failures" in line, line
    up = len(b"counted 0 before\n")
    assert f"{up} bytes up, {len(stream.expected())} bytes down" in line, line
    assert daemon.alive()


# ---- watchdog -----------------------------------------------------------------------------

def test_watchdog_pings_at_half_of_watchdog_usec(world: World, notified_daemon: Callable[..., Notified]) -> None:
    """With WATCHDOG_USEC set (WatchdogSec=), WATCHDOG=1 arrives every WATCHDOG_USEC/2,
    from the sandboxed daemon (sd_notify opens a socket per message)."""
    handle = notified_daemon(lambda port: config(port, {SINK: "a"}), WATCHDOG_USEC="200000")
    handle.notify.wait_for("WATCHDOG=1", timeout=2)
    time.sleep(1.0)
    pings = [m for m in handle.notify.collect() if m == "WATCHDOG=1"]
    assert 6 <= len(pings) <= 14, pings  # about one per 0.1 s over some 1.1 s
    assert handle.daemon.alive(), handle.daemon.log()
