"""The uid of the local process that opened a redirected connection.

One exact inet_diag lookup per connection, and a filtered dump when it finds
nothing (metaproxy.protocol.inet_diag has the bytes and the reasons). Why it
is done this way:

1. The client's own socket is the one whose local end is our peer and whose
   remote end is the ORIGINAL destination: REDIRECT rewrote the client's
   packets, not its socket. Our accepted socket, whose local end is the
   listener, belongs to us and says nothing about the client.
2. Not /proc/net/tcp: reading it lists every socket of the namespace, so its
   cost grows with sockets any user can open, and it runs in the event loop.
   The exact lookup costs the same with 10 or 18,000 sockets; the fallback
   (point 5) copies only the matches.
3. One non-blocking socket, kept between lookups: the kernel answers a
   sock_diag request while sendto() runs, so the reply is already queued when
   recv() is called; if it is not, the owner is unknown. The lookup never
   waits. The socket is opened at the first lookup, after the seccomp filter
   loads (it allows socket() for exactly AF_NETLINK, SOCK_RAW,
   NETLINK_SOCK_DIAG), and kept because opening and closing one was a
   quarter of a lookup's cost. An exact lookup's answer is one datagram, so
   the socket is empty after it; after anything else (an error, a short or
   foreign reply, a dump, which may be left unread) it is closed, so that no
   stale datagram can ever answer a later request. A forked child (the
   tests' namespaces) opens its own: the parent's asks the parent's
   namespace.
4. Any doubt (no such socket, not ESTABLISHED, an error, a malformed reply)
   answers None: the caller then isolates the connection on its own, never
   with a shared or root's token.
5. The fallback, for a peer port that REDIRECT's NAT changed: only when the
   exact lookup found no entry at all (an entry in another state is the
   client, gone or going: None). It runs on the same socket, one dump of both
   socket families, the filter evaluated by the kernel, so only the matches
   are copied; the kernel still walks its whole established table (about
   2 ms for 262,144 buckets here). The kernel queues the first datagram
   during sendto() and the next one during each recv(), so the reading stays
   non-blocking. At most MAX_RECVS datagrams of
   DUMP_BUFFER bytes per dump; a dump not finished by then, more than
   MAX_MATCHES matches, or any error: None.
"""

from __future__ import annotations

import itertools
import os
import socket

from metaproxy.protocol import inet_diag

_SEQUENCE = itertools.count(1)
MAX_RECVS = 4  # per dump: MAX_MATCHES entries fit in one or two datagrams
_kept: socket.socket | None = None  # the sock_diag socket between lookups (point 3)


def _netlink() -> socket.socket:
    global _kept
    if _kept is None:
        _kept = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                              inet_diag.NETLINK_SOCK_DIAG)
    return _kept


def _drop() -> None:
    """Close the kept socket, with whatever it may still hold."""
    global _kept
    if _kept is not None:
        _kept.close()
        _kept = None


os.register_at_fork(after_in_child=_drop)


def client_uid(peer: tuple[str, int], dest: tuple[str, int]) -> int | None:
    """Return the uid that owns the live client socket peer -> dest, or None if unknown.

    ``peer`` is the client's address and port as our accepted socket sees it,
    ``dest`` the original destination. The address form decides the family,
    not the accepted socket's: a v4-mapped peer of a dual-stack listener is an
    IPv4 flow and is looked up as one."""
    seq = next(_SEQUENCE) & 0xFFFF_FFFF
    try:
        request = inet_diag.exact_request(peer, dest, seq)
    except ValueError:
        return None
    try:
        netlink = _netlink()
        netlink.send(request)
        entry = inet_diag.parse_reply(netlink.recv(inet_diag.REPLY_BUFFER), seq)
        if entry is not None:
            return inet_diag.established_owner(entry, peer, dest)
        # The filter only now: the exact lookup answers almost every time.
        bytecode = inet_diag.flow_filter(peer[0], dest)
        try:
            entries = _dump(netlink, inet_diag.dump_request(dest[1], bytecode, seq + 1), seq + 1)
        finally:
            _drop()  # a dump may leave datagrams unread
    except OSError:  # EAGAIN (no reply queued), EAFNOSUPPORT (RestrictAddressFamilies), ENOBUFS...
        _drop()
        return None
    except ValueError:  # DiagError: a malformed or unexpected reply
        _drop()
        return None
    return inet_diag.agreed_owner(entries, peer[0], dest)


def _dump(netlink: socket.socket, request: bytes, seq: int) -> list[inet_diag.Entry]:
    """The entries of the filtered dump, read in at most MAX_RECVS datagrams.

    Raises DiagError for a dump that does not end in time, is malformed, or
    has more than MAX_MATCHES entries; OSError from the socket."""
    netlink.send(request)
    entries: list[inet_diag.Entry] = []
    for _ in range(MAX_RECVS):
        found, done = inet_diag.parse_dump(netlink.recv(inet_diag.DUMP_BUFFER), seq)
        entries += found
        if len(entries) > inet_diag.MAX_MATCHES:
            raise inet_diag.DiagError(f"more than {inet_diag.MAX_MATCHES} sockets match the flow")
        if done:
            return entries
    raise inet_diag.DiagError(f"the dump did not end within {MAX_RECVS} datagrams")
