"""An exact inet_diag lookup of one TCP socket, as netlink bytes. Pure.

The kernel's socket diagnostics (NETLINK_SOCK_DIAG, <linux/inet_diag.h>)
answer "who owns the socket with this 4-tuple?" in one request and one
reply, without listing any other socket. Why each field is what it is:

1. SOCK_DIAG_BY_FAMILY without NLM_F_DUMP is the exact lookup
   (inet_diag_cmd_exact): the kernel finds the socket the way it would for an
   arriving packet, so ``src`` is the socket's local end and ``dst`` its
   remote end. For a redirected client, that is (the client's address and
   port) -> (the ORIGINAL destination): the client's own socket never sees
   the REDIRECT, which only rewrote its packets.
2. The exact lookup ignores ``idiag_states`` (it is a filter of dumps), and it
   also finds TIME_WAIT entries, which carry uid 0, and listeners. So the
   reply's own state is checked: only ESTABLISHED counts, and anything else is
   "owner unknown", never root.
3. An IPv4 flow is looked up as AF_INET even when the daemon saw it through a
   dual-stack socket (::ffff:a.b.c.d): the kernel keeps IPv4 flows in the
   IPv4 lookup, whatever the client's socket family. The reply then may name
   the client's socket as AF_INET6 with v4-mapped addresses; both spellings
   compare equal here.
4. The cookie is INET_DIAG_NOCOOKIE: we do not know the client socket's
   cookie, and a wrong one makes the kernel answer ENOENT.

Host byte order for the netlink header and the cookie, network byte order
for ports and addresses, as in the kernel's structs.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

AF_INET = 2
AF_INET6 = 10
IPPROTO_TCP = 6
NETLINK_SOCK_DIAG = 4  # the netlink protocol (socket()'s third argument)
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST = 0x1
INET_DIAG_NOCOOKIE = 0xFFFF_FFFF

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ_V2 = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_SOCKID_PORTS = struct.Struct("!HH")  # sport, dport
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_ERRNO = struct.Struct("=i")
SOCKID_SIZE = _SOCKID_PORTS.size + 32 + _SOCKID_TAIL.size  # 48
REQUEST_SIZE = _NLMSGHDR.size + _REQ_V2.size + SOCKID_SIZE  # 72
MSG_SIZE = _MSG_HEAD.size + SOCKID_SIZE + _MSG_TAIL.size  # 72
# One exact reply is the 72-byte message and a few small attributes; this is
# many times that, so a reply never arrives truncated.
REPLY_BUFFER = 8192

Endpoint = tuple[str, int]


class TcpState(enum.IntEnum):
    """<net/tcp_states.h>."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


@dataclass(frozen=True, slots=True)
class Entry:
    """One socket as inet_diag describes it (addresses normalised: no v4-mapped form)."""

    state: int
    src: Endpoint
    dst: Endpoint
    uid: int
    inode: int


class DiagError(ValueError):
    """The reply is malformed, or is not the answer to our request."""


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # A scope (fe80::1%eth0) needs idiag_if, an interface index we cannot
    # compute without I/O; the lookup then simply misses (owner unknown).
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalise(endpoint: Endpoint) -> Endpoint:
    """The spelling used in comparisons: a v4-mapped address becomes IPv4."""
    return str(_ip(endpoint[0])), endpoint[1]


def _field(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The __be32[4] address field: an IPv4 address fills the first word."""
    return ip.packed.ljust(16, b"\0")


def exact_request(src: Endpoint, dst: Endpoint, seq: int) -> bytes:
    """The SOCK_DIAG_BY_FAMILY request for the one TCP socket src -> dst.

    Raises ValueError for a malformed address or a mix of IPv4 and IPv6, which
    no single socket can have."""
    local, remote = _ip(src[0]), _ip(dst[0])
    if local.version != remote.version:
        raise ValueError(f"no socket joins an IPv{local.version} and an IPv{remote.version} address")
    family = AF_INET if local.version == 4 else AF_INET6
    body = (_REQ_V2.pack(family, IPPROTO_TCP, 0, 1 << TcpState.ESTABLISHED)
            + _SOCKID_PORTS.pack(src[1], dst[1]) + _field(local) + _field(remote)
            + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq & 0xFFFF_FFFF, 0)
    return header + body


def _address(family: int, field: bytes) -> str:
    if family == AF_INET:
        return str(ipaddress.IPv4Address(field[:4]))
    if family == AF_INET6:
        return str(_ip(str(ipaddress.IPv6Address(field))))
    raise DiagError(f"inet_diag reply names address family {family}, expected AF_INET or AF_INET6")


def _entry(payload: bytes) -> Entry:
    if len(payload) < MSG_SIZE:
        raise DiagError(f"inet_diag message of {len(payload)} bytes, expected at least {MSG_SIZE}")
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(payload)
    offset = _MSG_HEAD.size
    sport, dport = _SOCKID_PORTS.unpack_from(payload, offset)
    offset += _SOCKID_PORTS.size
    src, dst = payload[offset:offset + 16], payload[offset + 16:offset + 32]
    offset += 32 + _SOCKID_TAIL.size
    _expires, _rqueue, _wqueue, uid, inode = _MSG_TAIL.unpack_from(payload, offset)
    return Entry(state, (_address(family, src), sport), (_address(family, dst), dport), uid, inode)


def parse_reply(data: bytes, seq: int) -> Entry | None:
    """The entry in the kernel's reply to request ``seq``, or None if the kernel
    found no such socket (ENOENT, or any other error it answered).

    Raises DiagError for bytes that are not a well-formed reply to ``seq``."""
    if len(data) < _NLMSGHDR.size:
        raise DiagError(f"netlink reply of {len(data)} bytes is shorter than its header")
    length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data)
    if length < _NLMSGHDR.size or length > len(data):
        raise DiagError(f"netlink message length {length} does not fit the {len(data)} bytes received")
    if got_seq != seq & 0xFFFF_FFFF:
        raise DiagError(f"netlink reply to request {got_seq}, expected {seq}")
    payload = data[_NLMSGHDR.size:length]
    if kind == SOCK_DIAG_BY_FAMILY:
        return _entry(payload)
    if kind == NLMSG_ERROR and len(payload) >= _ERRNO.size:
        return None  # typically -ENOENT: no socket with that 4-tuple
    if kind == NLMSG_DONE:
        return None
    raise DiagError(f"unexpected netlink message type {kind} in an inet_diag reply")


def established_owner(entry: Entry | None, src: Endpoint, dst: Endpoint) -> int | None:
    """The uid that owns the live socket src -> dst, or None when unknown.

    Only an ESTABLISHED entry for exactly this 4-tuple, still held by a
    process (a non-zero inode), counts. A TIME_WAIT entry (a client already
    gone) reports uid 0 without any process behind it, and a listener or a
    closing socket is not the client's live connection: all of those are
    unknown, so never mistaken for root."""
    if entry is None or entry.state != TcpState.ESTABLISHED or entry.inode == 0:
        return None
    if entry.src != normalise(src) or entry.dst != normalise(dst):
        return None
    return entry.uid
