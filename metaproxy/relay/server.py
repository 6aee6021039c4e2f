"""Accepting redirected connections, and deciding what to do with each.

Per connection: recover the original destination, refuse loops, pick the
upstream by port, open it (the only per-connection coroutine), then hand both
sockets to a callback-driven ``Relay``. A refusal is a TCP RST, so that the
application fails at once instead of hanging.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import socket
import time
from dataclasses import dataclass

from metaproxy.config.model import Config, RedirectMode, Upstream
from metaproxy.errors import DestinationUnknown, UpstreamError
from metaproxy.kernel.original_dst import original_destination
from metaproxy.kernel.peer_owner import client_uid
from metaproxy.config.model import Isolation
from metaproxy.privacy import Destination
from metaproxy.protocol.isolation import Isolator
from metaproxy.relay.pipes import PipePool
from metaproxy.relay.pump import Poller, Relay, reset
from metaproxy.upstream.connector import open_upstream

log = logging.getLogger("metaproxy.relay")

ACCEPT_BATCH = 64
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0
# A burst of at least this many relays at once is worth a give-back (see
# _give_back) when it has mostly closed; below it the heap barely grew.
GIVE_BACK_PEAK = 1024


@dataclass
class Counters:
    open: int = 0
    total: int = 0
    refused: int = 0
    failed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def status(self) -> str:
        return f"{self.open} open, {self.total} total, {self.refused} refused, {self.failed} upstream failures"


class Server:
    def __init__(self, config: Config, listeners: list[socket.socket]) -> None:
        self.listeners = listeners
        self.counters = Counters()
        self.pool = PipePool()
        self.relays: set[Relay] = set()
        self.handshakes: set[asyncio.Task[None]] = set()
        self._own = {(_norm(s.getsockname()[0]), s.getsockname()[1]) for s in listeners}
        self._next_id = 0
        self._accepting = False
        self._draining = False
        self._peak = 0  # most relays open at once since the last give-back
        self._backoff = _BACKOFF_FIRST
        self._loop = asyncio.get_running_loop()
        self.poller = Poller(self._loop)
        self._drained: asyncio.Event = asyncio.Event()
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Take new routes and upstreams; open connections keep theirs."""
        self.config = config
        # An upstream that keeps its name and mode keeps its isolator (and its
        # secret), so a reload does not move every destination or user to new
        # Tor circuits.
        old = getattr(self, "_isolators", {})
        self._isolators = {name: old[name] if name in old and old[name].mode is u.isolation
                           else Isolator(u.isolation) for name, u in config.upstreams.items()}

    # -- accepting ---------------------------------------------------------

    def start(self) -> None:
        self._accepting = True
        for sock in self.listeners:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def stop_accepting(self) -> None:
        self._accepting = False
        for sock in self.listeners:
            self._loop.remove_reader(sock.fileno())

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                client, peer = listener.accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    self._back_off(e)
                    return
                if e.errno == errno.ECONNABORTED:
                    continue
                log.error("accept on %s failed: %s", listener.getsockname(), e.strerror)
                continue
            self._backoff = _BACKOFF_FIRST
            self._serve(client, peer)

    def _back_off(self, err: OSError) -> None:
        """Out of descriptors: stop accepting for a while instead of spinning.

        The pending connections wait in the kernel's backlog; they are served
        once relays close and free descriptors.
        """
        log.warning("accept failed: %s; pausing accepts for %.2fs (%d open; raise LimitNOFILE?)",
                    err.strerror, self._backoff, self.counters.open)
        self.stop_accepting()
        self._loop.call_later(self._backoff, self._resume)
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _resume(self) -> None:
        if not self._accepting and not self._draining:
            self.start()

    # -- one connection ----------------------------------------------------

    def _serve(self, client: socket.socket, peer: tuple[str, int]) -> None:
        self._next_id += 1
        cid = self._next_id
        self.counters.total += 1
        if self.counters.open >= self.config.daemon.max_connections:
            self._refuse(client, cid, "too many connections (max_connections)")
            return
        try:
            ip, port = original_destination(client, self.config.daemon.mode)
        except DestinationUnknown as e:
            self._refuse(client, cid, str(e))
            return
        dest = Destination(_norm(ip), port)
        if (dest.ip, dest.port) in self._own or (port == self._listen_port() and _is_any(dest.ip)):
            self._refuse(client, cid, "the destination is this daemon itself: "
                         "the connection was not redirected (loop guard)")
            return
        upstream = self.config.upstream_for(port)
        if upstream is None:
            self._refuse(client, cid, "no route for the destination port", dest)
            return
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.counters.open += 1
        # Resolve the upstream and its isolator now: a SIGHUP reload may run before
        # the task's first step and rename or remove them (open connections keep theirs).
        isolator = self._isolators[upstream.name]
        task = self._loop.create_task(self._open(cid, client, peer, dest, upstream, isolator))
        self.handshakes.add(task)
        task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self.handshakes.discard(task)
        self._check_drained()

    async def _open(self, cid: int, client: socket.socket, peer: tuple[str, int],
                    dest: Destination, upstream: Upstream, isolator: Isolator) -> None:
        name = upstream.name
        uid = None
        if isolator.mode is Isolation.USER and not upstream.username:
            uid = client_uid(client.family, (_norm(peer[0]), peer[1]), (dest.ip, dest.port))
        credentials = isolator.credentials(dest.ip, dest.port, uid)
        started = time.monotonic()
        try:
            sock, early = await open_upstream(upstream, dest.ip, dest.port, credentials)
        except UpstreamError as e:
            self.counters.open -= 1
            self.counters.failed += 1
            self._refuse(client, cid, str(e), dest, count=False)
            return
        except asyncio.CancelledError:
            self.counters.open -= 1
            reset(client)
            raise
        except Exception as e:
            # A bug must cost one connection, never the daemon; its text may
            # quote values, so only the type is logged.
            self.counters.open -= 1
            self.counters.failed += 1
            self._refuse(client, cid, f"internal error ({type(e).__name__}) while opening the upstream",
                         dest, count=False)
            return
        log.info("cid=%d open via %s to %s", cid, name, dest,
                 extra={"cid": cid, "upstream": name, "dest": dest})
        relay = Relay(self.poller, client, sock, self.pool,
                      lambda r, reason: self._closed(r, reason, cid, name, dest, started))
        self.relays.add(relay)
        if len(self.relays) > self._peak:
            self._peak = len(self.relays)
        relay.start(early)

    def _closed(self, relay: Relay, reason: str, cid: int, name: str, dest: Destination,
                started: float) -> None:
        self.relays.discard(relay)
        if self._peak >= GIVE_BACK_PEAK and len(self.relays) <= self._peak // 8:
            self._give_back()
        self.counters.open -= 1
        self.counters.bytes_up += relay.bytes_up
        self.counters.bytes_down += relay.bytes_down
        duration = time.monotonic() - started
        log.info("cid=%d close (%s) via %s to %s: %d bytes up, %d down, %.3fs",
                 cid, reason, name, dest, relay.bytes_up, relay.bytes_down, duration,
                 extra={"cid": cid, "upstream": name, "dest": dest, "bytes_up": relay.bytes_up,
                        "bytes_down": relay.bytes_down, "duration": duration, "reason": reason})
        self._check_drained()

    def _give_back(self) -> None:
        """Return the memory of a burst of connections once most have closed.

        Two things keep it after the relays are freed: the set of relays never
        shrinks its table, and CPython's free lists (tuples, dicts, ...) keep
        blocks that pin otherwise empty allocator arenas. A fresh set and one
        full collection, which empties the free lists, let them go. It runs
        once per burst, after the close in progress.
        """
        self._peak = len(self.relays)
        self.relays = set(self.relays)
        self._loop.call_soon(gc.collect)

    def _check_drained(self) -> None:
        # Only a drain ends this way: accepts paused by _back_off are not a drain.
        if self._draining and not self.relays and not self.handshakes:
            self._drained.set()

    def _refuse(self, client: socket.socket, cid: int, why: str, dest: Destination | None = None,
                count: bool = True) -> None:
        if count:
            self.counters.refused += 1
        reset(client)
        log.warning("cid=%d refused: %s%s", cid, why, f" (to {dest})" if dest else "",
                    extra={"cid": cid, "dest": dest, "reason": why})

    def _listen_port(self) -> int:
        return self.listeners[0].getsockname()[1] if self.listeners else self.config.daemon.port

    # -- upkeep ------------------------------------------------------------

    def sweep_idle(self) -> None:
        """Close relays idle longer than idle_timeout. One timer for all of them."""
        limit = self.config.daemon.idle_timeout
        if limit <= 0:
            return
        deadline = self._loop.time() - limit
        for relay in [r for r in self.relays if r.last_active < deadline]:
            relay.abort("idle timeout")

    async def drain(self, seconds: float) -> None:
        """Stop accepting, let transfers finish for ``seconds``, then reset the rest.

        The listeners are closed first, so that a connection redirected during
        the drain is refused at once instead of waiting unaccepted in the
        backlog until the process exits. (Under socket activation systemd keeps
        its own copy, and new connections queue there for the next start.)
        """
        self._draining = True
        self.stop_accepting()
        for sock in self.listeners:
            sock.close()
        if self.relays or self.handshakes:
            log.info("draining %d connections for up to %gs", len(self.relays) + len(self.handshakes), seconds)
            try:
                async with asyncio.timeout(seconds):
                    await self._drained.wait()
            except TimeoutError:
                pass
        for task in list(self.handshakes):
            task.cancel()
        for relay in list(self.relays):
            relay.abort("shutdown: drain time over")
        self._drained.set()


def _norm(ip: str) -> str:
    return ip.split("%", 1)[0]


def _is_any(ip: str) -> bool:
    return ip in ("0.0.0.0", "::")


__all__ = ["Server", "Counters", "RedirectMode"]
