"""Opening a connection through an upstream proxy, driven by readiness callbacks.

A ``Dial`` owns one upstream socket from socket() to the open tunnel: a
non-blocking connect, then the protocol's state machine (metaproxy.protocol),
fed by reads that never ask for more than the machine wants, and one timer for
connect_timeout. No task or coroutine per connection: a dial is a handful of
callbacks on the relay's poller, the same one the relay uses afterwards.

1. The socket is ours: TCP to an IP literal, or a Unix socket for Tor's
   SocksPort. Nothing is ever resolved.
2. The outcome goes to ``on_done`` exactly once: the socket and the payload
   that came with the reply, or an UpstreamError whose text names the upstream
   and never the destination. ``cancel()`` ends a dial without calling it.
3. Which machine and which credentials an upstream gets is decided here, in
   ``handshake_for``: isolation credentials go to SOCKS5 only.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Callable, Protocol

from metaproxy.config.model import InetAddress, Upstream, UpstreamType
from metaproxy.errors import UpstreamError, UpstreamProtocolError, UpstreamRefused, UpstreamTimeout
from metaproxy.protocol.handshake import NEED_MORE, CredentialError, Done, Handshake, Refused, Send, Violation
from metaproxy.protocol.http_connect import HttpConnect
from metaproxy.protocol.socks4 import Socks4
from metaproxy.protocol.socks5 import Socks5
from metaproxy.upstream import unix_access

OnDone = Callable[[socket.socket | None, bytes, UpstreamError | None], None]


class Callbacks(Protocol):
    """What a dial needs from its event source (the relay's Poller fits)."""

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> object: ...
    def add_writer(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_writer(self, fd: int) -> object: ...


class Timer(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], object]], Timer]


def handshake_for(upstream: Upstream, dest_ip: str, dest_port: int,
                  isolation: tuple[str, str] | None) -> Handshake:
    """The state machine for ``upstream``; UpstreamError if it cannot carry dest at all.

    A configured username wins over isolation credentials, which only SOCKS5
    (Tor's IsolateSOCKSAuth) receives.
    """
    configured = (upstream.username, upstream.password) if upstream.username else None
    try:
        if upstream.type is UpstreamType.SOCKS5:
            return Socks5(dest_ip, dest_port, configured or isolation)
        if upstream.type is UpstreamType.HTTP:
            return HttpConnect(dest_ip, dest_port, configured)
        if ":" in dest_ip:
            raise UpstreamError(f"upstream {upstream.name} is {upstream.type.value}, which cannot carry "
                                "an IPv6 destination; route IPv6 ports through a socks5 or http upstream")
        return Socks4(dest_ip, dest_port, upstream.username)
    except CredentialError as e:  # a credential the protocol cannot carry: the config's fault
        raise UpstreamError(f"upstream {upstream.name}: {e}; shorten it in the config") from e


class Dial:
    __slots__ = ("_callbacks", "_upstream", "_machine", "_on_done", "_sock", "_fd", "_timer",
                 "_outbox", "_connected")

    def __init__(self, callbacks: Callbacks, call_later: CallLater, upstream: Upstream,
                 machine: Handshake, on_done: OnDone) -> None:
        self._callbacks = callbacks
        self._upstream = upstream
        self._machine = machine
        self._on_done: OnDone | None = on_done
        self._outbox = b""
        self._connected = False
        try:
            self._sock = _new_socket(upstream)
        except OSError as e:
            # Usually EMFILE: accept() took the last descriptor the limit allows.
            self._on_done = None
            on_done(None, b"", UpstreamError(f"upstream {upstream.name}: cannot create a socket: "
                                             f"{e.strerror or e} (raise LimitNOFILE, or lower "
                                             "max_connections)"))
            return
        self._fd = self._sock.fileno()
        self._timer: Timer | None = call_later(upstream.connect_timeout, self._expire)
        err = self._sock.connect_ex(_sockaddr(upstream))
        if err == 0:
            self._up()
        elif err == errno.EINPROGRESS:
            callbacks.add_writer(self._fd, self._connect_done)
        else:
            self._unreachable(err)

    def cancel(self) -> None:
        """Drop the dial (drain, or the client went away); on_done is not called."""
        if self._on_done is not None:
            self._on_done = None
            self._close()

    # -- connecting --------------------------------------------------------

    def _connect_done(self) -> None:
        self._callbacks.remove_writer(self._fd)
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._unreachable(err)
        else:
            self._up()

    def _up(self) -> None:
        self._connected = True
        self._callbacks.add_reader(self._fd, self._readable)
        self._send(self._machine.first())

    def _unreachable(self, err: int) -> None:
        u = self._upstream
        if not isinstance(u.address, InetAddress):  # unix: the socket's owner, group, mode and the remedy
            hint = unix_access.explain(err, u.address.path)
        elif err in (errno.EACCES, errno.EPERM):
            hint = "a firewall rule refuses the daemon's connection to it"
        elif err == errno.ECONNREFUSED:
            hint = "nothing listens there: is the proxy running?"
        else:
            hint = "check the address and the route to it"
        self._fail(UpstreamError(f"upstream {u.name} ({u.address}) is unreachable: {os.strerror(err)}; {hint}"))

    # -- the handshake -----------------------------------------------------

    def _readable(self) -> None:
        machine = self._machine
        try:
            data = self._sock.recv(machine.want)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(UpstreamError(f"upstream {self._upstream.name}: the {self._upstream.type.value} "
                                     f"handshake failed: {e.strerror or e}"))
            return
        if not data:
            self._fail(UpstreamProtocolError(f"upstream {self._upstream.name} closed the connection "
                                             f"during the {self._upstream.type.value} handshake"))
            return
        try:
            step = machine.receive(data)
        except Refused as e:
            self._fail(UpstreamRefused(f"upstream {self._upstream.name} refused CONNECT: {e.reason}", e.code))
            return
        except Violation as e:
            self._fail(UpstreamProtocolError(f"upstream {self._upstream.name}: {e}"))
            return
        if step is NEED_MORE:
            return
        if isinstance(step, Send):
            self._send(step.data)
        elif isinstance(step, Done):
            self._succeed(step.payload)

    def _send(self, data: bytes) -> None:
        """Handshake messages are small and the socket is new: a partial send is rare, but handled."""
        data = self._outbox + data
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._fail(UpstreamError(f"upstream {self._upstream.name}: the {self._upstream.type.value} "
                                     f"handshake failed: {e.strerror or e}"))
            return
        was_waiting = bool(self._outbox)
        self._outbox = data[sent:]
        if self._outbox and not was_waiting:
            self._callbacks.add_writer(self._fd, self._flush)
        elif not self._outbox and was_waiting:
            self._callbacks.remove_writer(self._fd)

    def _flush(self) -> None:
        self._send(b"")

    def _expire(self) -> None:
        self._timer = None
        stage = "complete the handshake" if self._connected else "accept the connection"
        self._fail(UpstreamTimeout(f"upstream {self._upstream.name} did not {stage} within "
                                   f"{self._upstream.connect_timeout:g}s (connect_timeout)"))

    # -- the outcome -------------------------------------------------------

    def _succeed(self, payload: bytes) -> None:
        on_done = self._on_done
        if on_done is None:
            return
        self._on_done = None
        self._stop_watching()
        on_done(self._sock, payload, None)

    def _fail(self, error: UpstreamError) -> None:
        on_done = self._on_done
        if on_done is None:
            return
        self._on_done = None
        self._close()
        on_done(None, b"", error)

    def _stop_watching(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._callbacks.remove_reader(self._fd)
        self._callbacks.remove_writer(self._fd)

    def _close(self) -> None:
        self._stop_watching()
        self._sock.close()


def _new_socket(upstream: Upstream) -> socket.socket:
    if isinstance(upstream.address, InetAddress):
        family = socket.AF_INET6 if ":" in upstream.address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    return sock


def _sockaddr(upstream: Upstream) -> Any:
    a = upstream.address
    return (a.host, a.port) if isinstance(a, InetAddress) else a.path
