"""The Server (metaproxy.relay.server) on real loopback listeners: drain, accept back-off, bugs.

No connection here is redirected, so none is relayed: the tests drive the
parts of the server that decide when to accept, when a drain is over, and
what a bug costs. Relaying is tested by the fuzz harness (test_relay_server_fuzz.py),
the pump's own tests (test_relay_pump.py) and the system tier.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from metaproxy.config import load
from metaproxy.relay import server as server_module
from metaproxy.relay.server import Server

CONFIG = """\
[daemon]
listen = 127.0.0.1, ::1
port = {port}
user = nobody
[upstreams]
    [[tor]]
    type = socks5
    address = 127.0.0.1:9
[routes]
* = tor
"""


def listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def make_server(tmp_path: Path) -> Server:
    sock = listener()
    path = tmp_path / "metaproxy.conf"
    path.write_text(CONFIG.format(port=sock.getsockname()[1]))
    return Server(load(str(path)), [sock])


class FakeRelay:
    bytes_up = 0
    bytes_down = 0


def run(body: Any) -> Any:
    async def main() -> Any:
        return await body()
    return asyncio.run(main())


def test_drain_closes_the_listeners_so_new_connections_are_refused_at_once(tmp_path: Path) -> None:
    async def body() -> None:
        server = make_server(tmp_path)
        port = server.listeners[0].getsockname()[1]
        server.start()
        await asyncio.wait_for(server.drain(5), 1)  # nothing open: returns at once
        probe = socket.socket()
        try:
            with pytest.raises(ConnectionRefusedError):
                probe.connect(("127.0.0.1", port))
        finally:
            probe.close()
    run(body)


def test_drain_ends_when_the_last_relay_closes(tmp_path: Path) -> None:
    async def body() -> float:
        server = make_server(tmp_path)
        server.start()
        relay = FakeRelay()
        server.relays.add(relay)  # type: ignore[arg-type]
        server.counters.open = 1
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, lambda: server._closed(relay, "closed", 1, "tor", None, 0.0))  # type: ignore[arg-type]
        started = loop.time()
        await server.drain(10)
        return loop.time() - started
    assert run(body) < 2


def test_relays_closing_while_accepts_are_paused_do_not_end_accepting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors, accepts pause; if every relay closes meanwhile, that is
    not a drain: accepting resumes after the pause."""
    monkeypatch.setattr(server_module, "_BACKOFF_FIRST", 0.05)

    async def body() -> tuple[bool, bool]:
        server = make_server(tmp_path)
        server.start()
        relay = FakeRelay()
        server.relays.add(relay)  # type: ignore[arg-type]
        server.counters.open = 1
        server._backoff = 0.05
        server._back_off(OSError(errno.EMFILE, "Too many open files"))
        server._closed(relay, "closed", 1, "tor", None, 0.0)  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        return server._accepting, server._drained.is_set()
    accepting, drained = run(body)
    assert accepting and not drained


def test_reload_keeps_isolation_secrets_of_unchanged_upstreams(tmp_path: Path) -> None:
    """A SIGHUP must not move every destination to new Tor circuits: an upstream that
    keeps its name and isolation rule keeps its credentials, even when the rule is a new
    object read from the file again; a changed rule gets new ones."""
    import dataclasses

    from metaproxy.config.model import Isolation, IsolationRule

    async def body() -> None:
        server = make_server(tmp_path)
        try:
            config = server.config
            rule = IsolationRule(frozenset({Isolation.DESTINATION}))
            tor = dataclasses.replace(config.upstreams["tor"], isolation=rule)
            server.apply(dataclasses.replace(config, upstreams={"tor": tor}))
            before = server._isolators["tor"].credentials("198.51.100.2", 80, None)
            reread = dataclasses.replace(tor, isolation=IsolationRule(frozenset({Isolation.DESTINATION})))
            server.apply(dataclasses.replace(config, upstreams={"tor": reread}))
            assert server._isolators["tor"].credentials("198.51.100.2", 80, None) == before
            server.apply(dataclasses.replace(config, upstreams={"tor": dataclasses.replace(
                tor, isolation=IsolationRule(frozenset({Isolation.USER, Isolation.DESTINATION}), 600))}))
            assert server._isolators["tor"].mode == IsolationRule(frozenset({Isolation.USER,
                                                                            Isolation.DESTINATION}), 600)
        finally:
            for sock in server.listeners:
                sock.close()
            server.poller.close()
    run(body)


def test_a_bug_while_serving_costs_that_connection_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The client is reset, the line names where it broke but not the exception's text,
    and the next connection is served."""
    calls = []

    def broken(sock: socket.socket, mode: Any) -> tuple[str, int]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug near 198.51.100.2:443")
        raise server_module.DestinationUnknown("cannot read the original destination")
    monkeypatch.setattr(server_module, "original_destination", broken)

    async def body() -> list[bytes | str]:
        server = make_server(tmp_path)
        port = server.listeners[0].getsockname()[1]
        server.start()
        outcomes: list[bytes | str] = []
        try:
            for _ in range(2):
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    try:
                        outcomes.append(await asyncio.wait_for(reader.read(10), 2))
                    finally:
                        writer.close()
                except ConnectionResetError:
                    outcomes.append("reset")
        finally:
            await server.drain(0)
            server.poller.close()
        return outcomes
    with caplog.at_level(logging.WARNING, logger="metaproxy"):
        outcomes = run(body)
    assert outcomes == ["reset", "reset"]
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("cid=1 internal error while serving the connection: RuntimeError at ")
               and "in broken" in line for line in lines), lines
    assert any("cid=2 refused: cannot read the original destination" in line for line in lines), lines
    assert not any("198.51.100.2" in line for line in lines), lines


def test_tproxy_loop_guard_refuses_every_address_on_a_wildcard_listeners_port(tmp_path: Path) -> None:
    """Under TPROXY the local end is the original destination, so a direct connection to
    any local address on a wildcard listener's port must be refused, not relayed back."""
    from metaproxy.privacy import Destination

    async def body() -> list[bool]:
        wildcard = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        wildcard.bind(("0.0.0.0", 0))
        wildcard.listen(4)
        port = wildcard.getsockname()[1]
        path = tmp_path / "metaproxy.conf"
        path.write_text(CONFIG.format(port=port).replace("[daemon]\n", "[daemon]\nmode = tproxy\n"))
        server = Server(load(str(path)), [wildcard])
        try:
            return [server._not_redirected(None, Destination(ip, p))  # type: ignore[arg-type]
                    for ip, p in (("192.0.2.1", port), ("127.0.0.1", port), ("0.0.0.0", port),
                                  ("198.51.100.2", 80), ("198.51.100.2", port + 1))]
        finally:
            wildcard.close()
            server.poller.close()
    assert run(body) == [True, True, True, False, False]


def test_owner_lookups_are_asked_for_loopback_arrivals_only_v4_mapped_included(tmp_path: Path) -> None:
    """REDIRECT in OUTPUT delivers local programs to a loopback address, as IPv4 or, on a
    dual-stack listener, v4-mapped IPv6; a gateway's clients arrive elsewhere."""
    async def body() -> list[bool]:
        server = make_server(tmp_path)
        try:
            return [server._may_be_local((ip, 8675)) for ip in
                    ("127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1", "192.0.2.1", "::ffff:192.0.2.1",
                     "2001:db8::1", "fe80::1%eth0", "127.0.0.1")]
        finally:
            server.listeners[0].close()
            server.poller.close()
    assert run(body) == [True, True, True, True, False, False, False, False, True]
