"""What the daemon tells systemd, through a real NOTIFY_SOCKET the test binds.

The Supervisor runs on a real event loop, wired to a stand-in server that has
only what the callables read: counters, the idle timeout, the pipe pool and the sweep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest

from metaproxy import service
from tests.unit.forked import require_seccomp, run_forked
from metaproxy.relay.server import Counters, Server


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """An abstract AF_UNIX datagram socket named by NOTIFY_SOCKET (as systemd provides)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"mpj{os.getpid()}-notify-{id(sock)}"
    sock.bind("\0" + name)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    for var in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    messages = []
    for _ in range(10_000):
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    return messages


def fake_server(**counts: int) -> Any:
    swept: list[float] = []
    return SimpleNamespace(counters=Counters(**counts), config=SimpleNamespace(daemon=SimpleNamespace(idle_timeout=900)),
                           pool=SimpleNamespace(in_use=3), sweep_idle=lambda: swept.append(0), swept=swept)


def supervise(server: Any, reload: Callable[[], None]) -> service.Supervisor:
    """The Supervisor wired to a stand-in server as daemon.py wires it to the real one."""
    return service.Supervisor(status=server.counters.status, counters=lambda: Server.counters_line(server),
                              sweep=server.sweep_idle, sweep_every=lambda: Server.sweep_interval(server),
                              reload=reload)


def run(body: Callable[[], Any]) -> Any:
    """Run body() inside a fresh event loop (the Supervisor needs a running one)."""
    async def main() -> Any:
        return await body()
    return asyncio.run(main())


def test_ready_says_ready_with_the_live_counts(notify: socket.socket) -> None:
    async def body() -> None:
        supervisor = supervise(fake_server(open=2, total=9, refused=1), reload=lambda: None)
        supervisor.ready()
        supervisor.close()
    run(body)
    assert received(notify) == ["READY=1\nSTATUS=2 open, 9 total, 1 refused, 0 upstream failures"]


def test_status_is_repeated_with_current_counts(notify: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "STATUS_EVERY", 0.05)

    async def body() -> None:
        server = fake_server()
        supervisor = supervise(server, reload=lambda: None)
        supervisor.ready()
        server.counters.open, server.counters.total = 5, 6
        await asyncio.sleep(0.18)
        supervisor.close()
    run(body)
    statuses = [m for m in received(notify) if m.startswith("STATUS=")]
    assert 2 <= len(statuses) <= 4
    assert all(m == "STATUS=5 open, 6 total, 0 refused, 0 upstream failures" for m in statuses)


def test_reload_brackets_the_reload_with_reloading_and_ready(notify: socket.socket) -> None:
    calls: list[str] = []

    async def body() -> None:
        supervisor = supervise(fake_server(), reload=lambda: calls.append("reload"))
        supervisor.reload()
    run(body)
    first, second = received(notify)
    assert first.startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert int(first.split("MONOTONIC_USEC=")[1]) > 0
    assert second.startswith("READY=1\nSTATUS=")
    assert calls == ["reload"]


def test_ready_follows_even_a_reload_that_raises(notify: socket.socket) -> None:
    def broken() -> None:
        raise RuntimeError("bug")

    async def body() -> None:
        supervisor = supervise(fake_server(), reload=broken)
        with pytest.raises(RuntimeError):
            supervisor.reload()
    run(body)
    assert [m.split("\n")[0] for m in received(notify)] == ["RELOADING=1", "READY=1"]


def test_stopping_is_said_with_the_counts(notify: socket.socket) -> None:
    async def body() -> None:
        supervise(fake_server(open=4), reload=lambda: None).stopping()
    run(body)
    assert received(notify) == ["STOPPING=1\nSTATUS=draining: 4 open, 0 total, 0 refused, 0 upstream failures"]


def test_watchdog_pings_at_half_the_interval(notify: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: a ping every 0.05 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    async def body() -> None:
        supervisor = supervise(fake_server(), reload=lambda: None)
        supervisor.ready()
        await asyncio.sleep(0.23)
        supervisor.close()
    run(body)
    pings = [m for m in received(notify) if m == "WATCHDOG=1"]
    assert 3 <= len(pings) <= 5


def test_no_watchdog_when_it_is_meant_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert service._watchdog_interval() == 0.0
    monkeypatch.delenv("WATCHDOG_PID")
    assert service._watchdog_interval() == 0.05
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert service._watchdog_interval() == 0.0


def test_a_vanished_notify_socket_is_logged_once_and_jobs_go_on(
        notify: socket.socket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(service, "STATUS_EVERY", 0.02)
    server = fake_server()

    async def body() -> None:
        supervisor = supervise(server, reload=lambda: None)
        monkeypatch.setenv("NOTIFY_SOCKET", f"@mpj{os.getpid()}-nobody-listens")
        supervisor.ready()
        await asyncio.sleep(0.15)
        supervisor.close()
    with caplog.at_level(logging.WARNING, logger="metaproxy"):
        run(body)
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1


def test_outside_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    async def body() -> None:
        supervisor = supervise(fake_server(), reload=lambda: None)
        supervisor.ready()
        supervisor.reload()
        supervisor.stopping()
        supervisor.close()
    run(body)


def test_sigusr1_line_has_every_counter(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        server = fake_server(open=1, total=10, refused=2, failed=3, gone=1, bytes_up=100, bytes_down=2000)
        supervise(server, reload=lambda: None).log_counters()
    with caplog.at_level(logging.INFO, logger="metaproxy"):
        run(body)
    assert caplog.records[-1].getMessage() == (
        "counters: 1 open, 10 total, 2 refused, 3 upstream failures; 100 bytes up, 2000 bytes down; "
        "3 pipes in use; 1 clients gone before their upstream was asked")


def test_notify_needs_only_af_unix_sockets_under_a_filter(notify: socket.socket) -> None:
    """libsystemd's sd_notify opens a new socket for every message. Under a filter that
    kills socket() for any family but AF_UNIX, READY/STATUS/STOPPING still go out; the
    daemon's real filter must allow AF_UNIX for this (forked child, as sandbox tests do)."""
    seccomp = require_seccomp()

    def body() -> None:
        from systemd import daemon as sd  # imported before the filter, as the daemon does
        only_unix = seccomp.SyscallFilter(seccomp.ALLOW)
        only_unix.add_rule(seccomp.KILL_PROCESS, "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
        only_unix.load()
        for message in ("READY=1", "STATUS=x", "STOPPING=1"):
            sd.notify(message)
    run_forked(body)
    assert received(notify) == ["READY=1", "STATUS=x", "STOPPING=1"]


def test_the_idle_sweep_follows_a_reloaded_idle_timeout() -> None:
    """The interval is asked again at every tick: after a reload that changes
    idle_timeout, the next sweep comes at the new pace without a restart."""
    server = fake_server()
    server.config.daemon.idle_timeout = 4.0  # a sweep every second

    async def body() -> int:
        supervisor = supervise(server, reload=lambda: None)
        supervisor.ready()
        await asyncio.sleep(0.5)
        server.config.daemon.idle_timeout = 120.0  # as after a reload: every 30 s from the next tick
        await asyncio.sleep(1.7)  # a fixed 1 s interval would have swept twice by now
        supervisor.close()
        return len(server.swept)
    assert run(body) == 1
