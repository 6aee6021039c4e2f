"""Accepting redirected connections, and deciding what to do with each.

One connection, top to bottom (``_serve``, then ``_opened``):

1. accept; refuse beyond max_connections;
2. recover the original destination (metaproxy.kernel); refuse if unknown;
3. refuse a connection that was never redirected (the loop guard);
4. pick the upstream by destination port; refuse a port with no route;
5. choose the handshake and the isolation credentials of the upstream's isolator;
6. skip a client that is already gone (it reset before we got to it);
   otherwise dial the upstream: connect and handshake, driven by callbacks
   on the relay's poller (metaproxy.upstream.connector);
7. hand both sockets to a ``Relay``, with the payload that came with the reply.

A refusal is a TCP RST, so that the application fails at once instead of
hanging. No per-connection line is logged unless ``log_connections`` asks
for it: when connections happen and how many bytes they move is traffic-
analysis material. Refusal lines are rate-limited.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import socket
import time
from dataclasses import dataclass

from metaproxy.config.model import Config, RedirectMode, Upstream, UpstreamType
from metaproxy.errors import DestinationUnknown, UpstreamError
from metaproxy.kernel.original_dst import original_destination
from metaproxy.kernel.peer_owner import client_uid
from metaproxy.logsetup import internal_error
from metaproxy.privacy import Destination
from metaproxy.protocol import address
from metaproxy.protocol.isolation import Isolator
from metaproxy.relay.pipes import PipePool
from metaproxy.relay.poller import poller_for
from metaproxy.relay.pump import Relay, reset
from metaproxy.upstream.connector import Dial, handshake_for

log = logging.getLogger("metaproxy.relay")

ACCEPT_BATCH = 64
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0
# A burst of at least this many relays at once is worth a give-back (see
# _give_back) when it has mostly closed; below it the heap barely grew.
GIVE_BACK_PEAK = 1024
# Refusal lines: at most log_refusals per window, then one line that counts the rest.
REFUSAL_WINDOW = 60.0


@dataclass
class Counters:
    open: int = 0
    total: int = 0
    refused: int = 0
    failed: int = 0
    gone: int = 0  # clients that reset before the upstream was asked (counted in refused too)
    bytes_up: int = 0
    bytes_down: int = 0

    def status(self) -> str:
        return f"{self.open} open, {self.total} total, {self.refused} refused, {self.failed} upstream failures"


class RefusalLog:
    """Refusal lines, at most ``limit`` per ``window`` seconds, then one line that counts the rest.

    A flood of refused connections (a port scan, a misrouted burst) must not
    flood the journal, which keeps what it is given on disk.
    """

    __slots__ = ("_loop", "limit", "_window", "_count", "_suppressed", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, window: float = REFUSAL_WINDOW) -> None:
        self._loop, self.limit, self._window = loop, limit, window
        self._count = 0
        self._suppressed = 0
        self._timer: asyncio.TimerHandle | None = None

    def refused(self, cid: int, why: str, dest: Destination | None) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self._window, self._end_window)
        if self._count >= self.limit:
            self._suppressed += 1
            return
        self._count += 1
        log.warning("cid=%d refused: %s%s", cid, why, f" (to {dest})" if dest else "",
                    extra={"cid": cid, "dest": dest, "reason": why})

    def _end_window(self) -> None:
        self._timer = None
        self._count = 0
        if self._suppressed:
            log.warning("%d more refusals in the last %gs were not logged (the limit is %d per %gs)",
                        self._suppressed, self._window, self.limit, self._window)
            self._suppressed = 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._end_window()


class _Pending:
    """A client whose upstream is being dialled."""

    __slots__ = ("client", "dial")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.dial: Dial | None = None


class Server:
    def __init__(self, config: Config, listeners: list[socket.socket]) -> None:
        self.listeners = listeners
        self.counters = Counters()
        self.pool = PipePool()
        self.relays: set[Relay] = set()
        self.pending: dict[int, _Pending] = {}  # by cid: clients whose upstream is being dialled
        self._own = {(_norm(s.getsockname()[0]), s.getsockname()[1]) for s in listeners}
        self._wildcard_ports = {port for ip, port in self._own if _is_any(ip)}
        self._next_id = 0
        self._accepting = False
        self._draining = False
        self._peak = 0  # most relays open at once since the last give-back
        self._backoff = _BACKOFF_FIRST
        self._loop = asyncio.get_running_loop()
        self.poller = poller_for(self._loop)
        self.refusals = RefusalLog(self._loop, config.daemon.log_refusals)
        self._drained: asyncio.Event = asyncio.Event()
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Take new routes and upstreams; open connections keep theirs."""
        self.config = config
        self._log_connections = config.daemon.log_connections
        self.refusals.limit = config.daemon.log_refusals
        # An upstream that keeps its name and mode keeps its isolator (and its
        # secret), so a reload does not move every destination or user to new
        # Tor circuits.
        old = getattr(self, "_isolators", {})
        self._isolators = {name: old[name] if name in old and old[name].mode == u.isolation
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
            try:
                self._serve(client, peer)
            except Exception as e:
                # A bug must cost one connection, never the daemon or the rest of this batch.
                self.counters.failed += 1
                reset(client)
                log.error("cid=%d internal error while serving the connection: %s", self._next_id,
                          internal_error(e), extra={"cid": self._next_id})

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

    # -- one connection, top to bottom -------------------------------------

    def _serve(self, client: socket.socket, peer: tuple[str, int]) -> None:
        self._next_id += 1
        cid = self._next_id
        counters = self.counters
        counters.total += 1
        config = self.config
        if counters.open >= config.daemon.max_connections:
            self._refuse(client, cid, "too many connections (max_connections)")
            return
        try:
            ip, port = original_destination(client, config.daemon.mode)
        except DestinationUnknown as e:
            self._refuse(client, cid, str(e))
            return
        dest = Destination(_norm(ip), port)
        # Our end of the accepted socket: the loop guard and the owner lookup both ask.
        local = client.getsockname()
        if self._not_redirected(local, dest):
            self._refuse(client, cid, "the destination is this daemon itself: "
                         "the connection was not redirected (loop guard)")
            return
        upstream = config.upstream_for(port)
        if upstream is None:
            self._refuse(client, cid, "no route for the destination port", dest)
            return
        try:
            machine = handshake_for(upstream, dest.ip, dest.port, self._isolation(upstream, local, peer, dest))
        except UpstreamError as e:
            counters.failed += 1
            self._refuse(client, cid, str(e), dest, count=False)
            return
        # After the owner lookup: had the client reset and another user's new
        # socket taken its 4-tuple, this catches it too.
        if client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            # It reset before we got to it: asking the upstream (with
            # isolation = connection, building a Tor circuit) would be waste.
            counters.gone += 1
            self._refuse(client, cid, "the client reset the connection before it was relayed")
            return
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        counters.open += 1
        pending = self.pending[cid] = _Pending(client)
        started, name = time.monotonic(), upstream.name
        dial = Dial(self.poller, self._loop.call_later, upstream, machine,
                    lambda sock, early, error: self._opened(cid, name, dest, started, sock, early, error))
        if cid in self.pending:  # the dial may have failed at once, and said so already
            pending.dial = dial

    def _isolation(self, upstream: Upstream, local: tuple[str, int], peer: tuple[str, int],
                   dest: Destination) -> tuple[str, str] | None:
        """The isolation credentials for this connection: SOCKS5 without a configured user only."""
        if upstream.type is not UpstreamType.SOCKS5 or upstream.username:
            return None
        isolator = self._isolators[upstream.name]
        uid = None
        if isolator.needs_owner and self._may_be_local(local):
            uid = client_uid((_norm(peer[0]), peer[1]), (dest.ip, dest.port))
        # isolation = client keys on the peer's address; it is never logged.
        client = _norm(peer[0]) if isolator.needs_client else None
        return isolator.credentials(dest.ip, dest.port, uid, client=client)

    def _may_be_local(self, local: tuple[str, int]) -> bool:
        """Could this client's socket be in our network namespace, so that it has an owner?

        REDIRECT in OUTPUT (local programs) sends to loopback; a client behind
        a gateway (PREROUTING) arrives on the interface's address and has no
        socket here. Asking the kernel for it would cost a full table walk
        (the lookup's fallback) for nothing: it gets fresh credentials.
        """
        if self.config.daemon.mode is RedirectMode.TPROXY:
            return True
        # canonical: a dual-stack listener's IPv4 client (::ffff:127.0.0.1) as IPv4,
        # so that 127.0.0.0/8 and ::1 are all there is to loopback.
        ip = address.canonical(local[0])
        return ip.startswith("127.") or ip == "::1"

    def _opened(self, cid: int, name: str, dest: Destination, started: float,
                sock: socket.socket | None, early: bytes, error: UpstreamError | None) -> None:
        pending = self.pending.pop(cid, None)
        if pending is None:  # cancelled by the drain: the client is already reset
            if sock is not None:
                reset(sock)
            return
        client = pending.client
        if sock is None:
            self.counters.open -= 1
            self.counters.failed += 1
            self._refuse(client, cid, str(error), dest, count=False)
            self._check_drained()
            return
        if self._log_connections:
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
        if self._log_connections:
            duration = time.monotonic() - started
            log.info("cid=%d close (%s) via %s to %s: %d bytes up, %d down, %.3fs",
                     cid, reason, name, dest, relay.bytes_up, relay.bytes_down, duration,
                     extra={"cid": cid, "upstream": name, "dest": dest, "bytes_up": relay.bytes_up,
                            "bytes_down": relay.bytes_down, "duration": duration, "reason": reason})
        self._check_drained()

    def _not_redirected(self, local: tuple[str, int], dest: Destination) -> bool:
        """The loop guard: was this connection meant for the daemon itself?

        Under REDIRECT, a connection that no rule rewrote has the original
        destination of its own local end: whatever ``listen`` says (a
        wildcard, or an address of this host other than the one dialled),
        that is exactly the case where relaying would come back to us.
        Under TPROXY the local end always is the original destination, so
        that test cannot tell; the listeners' addresses are the guard. A
        wildcard listener answers on every local address, and a local address
        cannot be told from a remote one without the routing table: every
        destination on its port is refused, at the cost of relaying nothing
        to a remote service on that one port.
        """
        if self.config.daemon.mode is RedirectMode.TPROXY:
            return (dest.ip, dest.port) in self._own or dest.port in self._wildcard_ports
        return dest.port == local[1] and dest.ip == _norm(local[0])

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
        if self._draining and not self.relays and not self.pending:
            self._drained.set()

    def _refuse(self, client: socket.socket, cid: int, why: str, dest: Destination | None = None,
                count: bool = True) -> None:
        if count:
            self.counters.refused += 1
        reset(client)
        self.refusals.refused(cid, why, dest)

    # -- upkeep ------------------------------------------------------------

    def counters_line(self) -> str:
        """What SIGUSR1 logs."""
        c = self.counters
        return (f"{c.status()}; {c.bytes_up} bytes up, {c.bytes_down} bytes down; {self.pool.in_use} pipes in use; "
                f"{c.gone} clients gone before their upstream was asked")

    def sweep_interval(self) -> float:
        """Seconds between idle sweeps: a quarter of idle_timeout, from 1 to 30 s."""
        return min(30.0, max(1.0, self.config.daemon.idle_timeout / 4))

    def sweep_idle(self) -> None:
        """Close relays idle longer than idle_timeout. One timer for all of them."""
        limit = self.config.daemon.idle_timeout
        if limit <= 0:
            return
        deadline = self.poller.time() - limit  # the relays' clock
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
        if self.relays or self.pending:
            log.info("draining %d connections for up to %gs", len(self.relays) + len(self.pending), seconds)
            try:
                async with asyncio.timeout(seconds):
                    await self._drained.wait()
            except TimeoutError:
                pass
        for pending in list(self.pending.values()):
            # A dial cut short: its client is reset and no longer counted as open.
            if pending.dial is not None:
                pending.dial.cancel()
            reset(pending.client)
            self.counters.open -= 1
        self.pending.clear()
        for relay in list(self.relays):
            relay.abort("shutdown: drain time over")
        self.refusals.close()
        self._drained.set()


def _norm(ip: str) -> str:
    return ip.split("%", 1)[0]


def _is_any(ip: str) -> bool:
    return ip in ("0.0.0.0", "::")


__all__ = ["Server", "Counters", "RedirectMode"]
