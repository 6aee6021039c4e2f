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

When the exact lookup finds nothing, a filtered dump is the fallback
(flow_requests, parse_dump, agreed_owner). Why:

5. REDIRECT is NAT: if conntrack still remembers an earlier redirected
   connection from the same client address and port (to another original
   destination), the kernel gives the new one another source port on its way
   to us. We see peer port 37800 while the client's socket is bound to 40000,
   so the exact 4-tuple names no socket, and one user was split over extra
   Tor circuits.
6. The fallback asks for every TCP socket from the peer's address (any port)
   to the original destination. The kernel runs the condition (a bytecode
   filter, INET_DIAG_REQ_BYTECODE) while it walks its own table, so only the
   matches are copied to us, whatever the number of other sockets.
7. We cannot tell which match is ours, so the matches vote: every one that is
   not TIME_WAIT must carry the same uid, and one of them must be live
   (ESTABLISHED, held by a process). A closing socket still votes with its
   creator's uid: our own client may have half-closed already, and another
   user's live socket must not speak for it. TIME_WAIT entries carry uid 0
   and no process; they are old connections and do not vote. Disagreement,
   no live match, or too many matches: unknown, never root.
8. One dump, of both socket families: the client's socket of an IPv4 flow
   may be AF_INET6 with v4-mapped addresses, and a host condition of family
   AF_INET matches those too (inet_diag_bc_run compares the last word). A
   SOCK_DIAG_BY_FAMILY dump names one family, and each dump walks the whole
   established table (about 2 ms for 262,144 buckets here, however few
   sockets): so the dump is the older TCPDIAG_GETSOCK request, whose family
   is AF_UNSPEC ("all"), with the same filter attribute. Its replies carry
   the same inet_diag_msg under the type TCPDIAG_GETSOCK.

Host byte order for the netlink header, the cookie and the filter's ports,
network byte order for the request's and reply's ports and addresses, as in
the kernel's structs.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from metaproxy.protocol import address

AF_INET = 2
AF_INET6 = 10
IPPROTO_TCP = 6
NETLINK_SOCK_DIAG = 4  # the netlink protocol (socket()'s third argument)
SOCK_DIAG_BY_FAMILY = 20
TCPDIAG_GETSOCK = 18  # the older request type: struct inet_diag_req, any family
AF_UNSPEC = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
INET_DIAG_REQ_BYTECODE = 1  # the request's one attribute: the filter
INET_DIAG_NOCOOKIE = 0xFFFF_FFFF

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ_V2 = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_REQ_V1_HEAD = struct.Struct("=BBBB")  # family, src_len, dst_len, ext; then the sockid
_REQ_V1_TAIL = struct.Struct("=II")  # states, dbs
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_SOCKID_PORTS = struct.Struct("!HH")  # sport, dport
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_ERRNO = struct.Struct("=i")
_NLATTR = struct.Struct("=HH")  # len, type
_BC_OP = struct.Struct("=BBH")  # code, yes, no: byte offsets to the next op
_HOSTCOND = struct.Struct("=BBxxi")  # family, prefix_len, pad, port (-1: any)
SOCKID_SIZE = _SOCKID_PORTS.size + 32 + _SOCKID_TAIL.size  # 48
REQUEST_SIZE = _NLMSGHDR.size + _REQ_V2.size + SOCKID_SIZE  # 72
MSG_SIZE = _MSG_HEAD.size + SOCKID_SIZE + _MSG_TAIL.size  # 72
# One exact reply is the 72-byte message and a few small attributes; this is
# many times that, so a reply never arrives truncated.
REPLY_BUFFER = 8192
# A dump arrives in datagrams of at most 32 KiB (the kernel caps a dump skb
# there); a bigger buffer would only be wasted.
DUMP_BUFFER = 32768
# More matches than this from one address to one destination: unknown. It
# bounds the reading (about 125 bytes a match) and the vote.
MAX_MATCHES = 64

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


class BcOp(enum.IntEnum):
    """The filter's operations we use (<linux/inet_diag.h>, enum INET_DIAG_BC_*)."""

    S_COND = 7  # the socket's local end: address prefix, and port unless -1
    D_COND = 8  # the socket's remote end


# The states that vote in the fallback: every client-side state a socket can
# be in while our accepted socket is open. Not TIME_WAIT (uid 0, no
# process), not LISTEN, SYN_RECV, NEW_SYN_RECV (server sides).
VOTING_STATES = frozenset({TcpState.ESTABLISHED, TcpState.SYN_SENT, TcpState.FIN_WAIT1, TcpState.FIN_WAIT2,
                           TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING})


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


_NAMES = {AF_INET: "IPv4", AF_INET6: "IPv6"}


def _ip(text: str) -> tuple[int, bytes]:
    """(family, address bytes) of an address text, a v4-mapped one as IPv4; ValueError if none."""
    # A scope (fe80::1%eth0) needs idiag_if, an interface index we cannot
    # compute without I/O; the lookup then simply misses (owner unknown).
    packed = address.pack(text.split("%", 1)[0])
    if len(packed) == 4:
        return AF_INET, packed
    if packed[:12] == address.V4_MAPPED:
        return AF_INET, packed[12:]
    return AF_INET6, packed


def normalise(endpoint: Endpoint) -> Endpoint:
    """The spelling used in comparisons: a v4-mapped address becomes IPv4."""
    return address.canonical(endpoint[0]), endpoint[1]


def _field(packed: bytes) -> bytes:
    """The __be32[4] address field: an IPv4 address fills the first word."""
    return packed.ljust(16, b"\0")


def exact_request(src: Endpoint, dst: Endpoint, seq: int) -> bytes:
    """The SOCK_DIAG_BY_FAMILY request for the one TCP socket src -> dst.

    Raises ValueError for a malformed address or a mix of IPv4 and IPv6, which
    no single socket can have."""
    (family, local), (remote_family, remote) = _ip(src[0]), _ip(dst[0])
    if family != remote_family:
        raise ValueError(f"no socket joins an {_NAMES[family]} and an {_NAMES[remote_family]} address")
    body = (_REQ_V2.pack(family, IPPROTO_TCP, 0, 1 << TcpState.ESTABLISHED)
            + _SOCKID_PORTS.pack(src[1], dst[1]) + _field(local) + _field(remote)
            + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq & 0xFFFF_FFFF, 0)
    return header + body


def _address(family: int, field: bytes) -> str:
    if family == AF_INET:
        return address.unpack(field[:4])
    if family == AF_INET6:
        return address.unpack(field[12:] if field[:12] == address.V4_MAPPED else field)
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


# -- the fallback: one filtered dump of both socket families -----------------


def _condition(code: BcOp, family: int, packed: bytes, port: int, reject: int) -> bytes:
    """One host condition; ``reject`` is the byte offset, from this op, past the filter's end."""
    body = _HOSTCOND.pack(family, 8 * len(packed), port) + packed
    size = _BC_OP.size + len(body)
    return _BC_OP.pack(code, size, reject) + body


def flow_filter(peer_ip: str, dest: Endpoint) -> bytes:
    """The bytecode "local address is peer_ip (any port) and remote end is dest".

    Each op goes on to the next when it holds ("yes"), and jumps 4 bytes past
    the end when it fails ("no"), which the kernel reads as "rejected"; the
    socket matches when the run ends exactly at the end. Raises ValueError as
    exact_request does."""
    (family, local), (remote_family, remote) = _ip(peer_ip), _ip(dest[0])
    if family != remote_family:
        raise ValueError(f"no socket joins an {_NAMES[family]} and an {_NAMES[remote_family]} address")
    step = _BC_OP.size + _HOSTCOND.size + len(local)
    return (_condition(BcOp.S_COND, family, local, -1, 2 * step + 4)
            + _condition(BcOp.D_COND, family, remote, dest[1], step + 4))


def dump_request(dest_port: int, bytecode: bytes, seq: int) -> bytes:
    """The dump of the TCP sockets of both families in the voting states whose remote port
    is dest_port (the kernel's own pre-filter) and that pass ``bytecode`` (point 8)."""
    states = 0
    for state in VOTING_STATES:
        states |= 1 << state
    sockid = (_SOCKID_PORTS.pack(0, dest_port) + bytes(32)
              + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    attribute = _NLATTR.pack(_NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    body = _REQ_V1_HEAD.pack(AF_UNSPEC, 0, 0, 0) + sockid + _REQ_V1_TAIL.pack(states, 0) + attribute
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), TCPDIAG_GETSOCK, flags, seq & 0xFFFF_FFFF, 0) + body


def parse_dump(data: bytes, seq: int) -> tuple[list[Entry], bool]:
    """The entries in one datagram of the dump ``seq``, and whether it ended the dump.

    Raises DiagError for malformed bytes, a reply to another request, or an
    error the kernel answered (NLMSG_ERROR, or NLMSG_DONE with a negative
    code): for the caller, all of them mean "owner unknown"."""
    entries: list[Entry] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _NLMSGHDR.size:
            raise DiagError(f"{len(data) - offset} bytes left at offset {offset}, shorter than a netlink header")
        length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or length > len(data) - offset:
            raise DiagError(f"netlink message length {length} at offset {offset} does not fit "
                            f"the {len(data)} bytes received")
        if got_seq != seq & 0xFFFF_FFFF:
            raise DiagError(f"netlink reply to request {got_seq}, expected {seq}")
        payload = data[offset + _NLMSGHDR.size:offset + length]
        if kind == NLMSG_DONE:
            if len(payload) >= _ERRNO.size and _ERRNO.unpack_from(payload)[0] < 0:
                raise DiagError(f"the kernel ended the dump with error {-_ERRNO.unpack_from(payload)[0]}")
            return entries, True
        if kind == NLMSG_ERROR:
            code = _ERRNO.unpack_from(payload)[0] if len(payload) >= _ERRNO.size else None
            raise DiagError(f"the kernel refused the dump (error {code if code is None else -code})")
        if kind != TCPDIAG_GETSOCK:
            raise DiagError(f"unexpected netlink message type {kind} in an inet_diag dump")
        entries.append(_entry(payload))
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return entries, False


def agreed_owner(entries: list[Entry], peer_ip: str, dest: Endpoint) -> int | None:
    """The uid all voting matches agree on, or None when unknown (point 7).

    A match is an entry from peer_ip (any port) to dest in a voting state;
    anything else the kernel sent is ignored. The answer needs at least one
    live match (ESTABLISHED, non-zero inode), every match carrying its uid,
    and no more than MAX_MATCHES of them."""
    local, remote = normalise((peer_ip, 0))[0], normalise(dest)
    matches = [e for e in entries if e.state in VOTING_STATES and e.src[0] == local and e.dst == remote]
    if not matches or len(matches) > MAX_MATCHES:
        return None
    if not any(e.state == TcpState.ESTABLISHED and e.inode != 0 for e in matches):
        return None
    uids = {e.uid for e in matches}
    return uids.pop() if len(uids) == 1 else None
