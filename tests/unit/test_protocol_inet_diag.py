"""The exact inet_diag request and the reading of its reply, with bytes alone.

The reply fixtures were captured from the kernel of the test machines (an
exact SOCK_DIAG_BY_FAMILY lookup of 127.0.0.1:40000 -> 127.0.0.1:37511):
an ESTABLISHED socket, the same 4-tuple in TIME_WAIT after close(), and a
4-tuple with no socket (ENOENT). The kernel appends attributes after the
72-byte inet_diag_msg; the reader must skip them.

The fallback's fixtures were captured the same way: the filtered dump of the
sockets from 127.0.0.1 (any port) to 127.0.0.1:37511, while an AF_INET client
(port 40000) and an AF_INET6 client connected to ::ffff:127.0.0.1 (port
40001) were live; its end (NLMSG_DONE, in a datagram of its own); and the
kernel's EINVAL for a filter cut short.
"""

from __future__ import annotations

import struct

import pytest

from metaproxy.protocol import inet_diag
from metaproxy.protocol.inet_diag import (Entry, TcpState, agreed_owner, dump_request, established_owner,
                                          exact_request, flow_filter, parse_dump, parse_reply)

REQUEST_V4 = bytes.fromhex(
    "48000000" "1400" "0100" "07000000" "00000000"  # nlmsghdr: 72 bytes, SOCK_DIAG_BY_FAMILY, REQUEST, seq 7
    "02" "06" "00" "00" "02000000"  # AF_INET, IPPROTO_TCP, no extensions, pad, states {ESTABLISHED}
    "9c40" "0050"  # sport 40000, dport 80 (network order)
    "c0000201" "000000000000000000000000"  # src 192.0.2.1 in the first word
    "c6336402" "000000000000000000000000"  # dst 198.51.100.2
    "00000000" "ffffffff" "ffffffff")  # any interface, INET_DIAG_NOCOOKIE

ESTABLISHED_REPLY = bytes.fromhex(
    "7c00000014000000070000004d670000020100009c4092877f00000100000000000000000000000"
    "07f000001000000000000000000000000000000000d00000000000000000000000000000000000000"
    "000000004c9f0000050008000000000008000f00000000000c00150001000000000000000600160052000000")
TIME_WAIT_REPLY = bytes.fromhex(
    "6000000014000000070000004d670000020603009c4092877f00000100000000000000000000000"
    "07f000001000000000000000000000000000000000d00000000000000fce90000000000000000000000"
    "00000000000000000008000f0000000000")
ENOENT_REPLY = bytes.fromhex(
    "5c00000002000000070000004d670000feffffff4800000014000100070000000000000002060000"
    "020000009c4192877f0000010000000000000000000000007f00000100000000000000000000000000"
    "000000ffffffffffffffff")
LOCAL, REMOTE = ("127.0.0.1", 40000), ("127.0.0.1", 37511)


def _reply(family: int, state: int, src: bytes, sport: int, dst: bytes, dport: int, uid: int, inode: int,
           seq: int = 7) -> bytes:
    """A hand-built reply, field by field as in struct inet_diag_msg."""
    body = (struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH", sport, dport)
            + src.ljust(16, b"\0") + dst.ljust(16, b"\0") + struct.pack("=III", 0, 1, 2)
            + struct.pack("=IIIII", 0, 0, 0, uid, inode))
    return struct.pack("=IHHII", 16 + len(body), 20, 0, seq, 1234) + body


def test_request_is_the_exact_ipv4_lookup_byte_for_byte() -> None:
    """72 bytes: header, inet_diag_req_v2 for TCP, the 4-tuple with IPv4 in the first word, no cookie."""
    assert exact_request(("192.0.2.1", 40000), ("198.51.100.2", 80), 7) == REQUEST_V4
    assert len(REQUEST_V4) == inet_diag.REQUEST_SIZE


def test_v4_mapped_addresses_are_looked_up_as_ipv4() -> None:
    """A dual-stack listener's ::ffff:a.b.c.d peer is an IPv4 flow: same request as plain IPv4."""
    mapped = exact_request(("::ffff:192.0.2.1", 40000), ("::ffff:198.51.100.2", 80), 7)
    assert mapped == REQUEST_V4
    assert exact_request(("::ffff:192.0.2.1", 40000), ("198.51.100.2", 80), 7) == REQUEST_V4


def test_ipv6_request_carries_all_four_words() -> None:
    request = exact_request(("2001:db8:1::1", 40000), ("2001:db8:2::2", 443), 9)
    assert request[16] == inet_diag.AF_INET6
    assert request[24:28] == bytes.fromhex("9c4001bb")
    assert request[28:44] == bytes.fromhex("20010db8000100000000000000000001")
    assert request[44:60] == bytes.fromhex("20010db8000200000000000000000002")
    assert struct.unpack_from("=I", request, 8)[0] == 9


@pytest.mark.parametrize("src, dst", [(("192.0.2.1", 1), ("2001:db8::2", 80)), (("not an ip", 1), ("192.0.2.2", 80)),
                                      (("2001:db8::1", 1), ("198.51.100.2", 80))])
def test_no_request_for_a_tuple_no_socket_can_have(src: tuple[str, int], dst: tuple[str, int]) -> None:
    with pytest.raises(ValueError):
        exact_request(src, dst, 1)


def test_established_reply_names_its_uid_and_skips_the_attributes() -> None:
    entry = parse_reply(ESTABLISHED_REPLY, 7)
    assert entry == Entry(TcpState.ESTABLISHED, LOCAL, REMOTE, 0, 40780)
    assert established_owner(entry, LOCAL, REMOTE) == 0


def test_time_wait_reply_reports_uid_0_and_counts_as_unknown() -> None:
    """A client already gone (TIME_WAIT) shows uid 0 and inode 0: that is not root's socket."""
    entry = parse_reply(TIME_WAIT_REPLY, 7)
    assert entry is not None and entry.state == TcpState.TIME_WAIT and entry.uid == 0 and entry.inode == 0
    assert established_owner(entry, LOCAL, REMOTE) is None


def test_enoent_reply_means_no_socket() -> None:
    assert parse_reply(ENOENT_REPLY, 7) is None


@pytest.mark.parametrize("state", [s for s in TcpState if s is not TcpState.ESTABLISHED])
def test_only_an_established_entry_counts(state: TcpState) -> None:
    """FIN_WAIT, CLOSE_WAIT, LISTEN, ... with any uid: owner unknown."""
    reply = _reply(inet_diag.AF_INET, state, bytes([192, 0, 2, 1]), 40000, bytes([198, 51, 100, 2]), 80, 1000, 99)
    assert established_owner(parse_reply(reply, 7), ("192.0.2.1", 40000), ("198.51.100.2", 80)) is None


def test_an_established_entry_no_process_holds_counts_as_unknown() -> None:
    reply = _reply(inet_diag.AF_INET, TcpState.ESTABLISHED, bytes([192, 0, 2, 1]), 40000,
                   bytes([198, 51, 100, 2]), 80, 1000, 0)
    assert established_owner(parse_reply(reply, 7), ("192.0.2.1", 40000), ("198.51.100.2", 80)) is None


def test_an_entry_for_another_tuple_counts_as_unknown() -> None:
    reply = _reply(inet_diag.AF_INET, TcpState.ESTABLISHED, bytes([192, 0, 2, 1]), 40000,
                   bytes([198, 51, 100, 2]), 80, 1000, 5)
    assert established_owner(parse_reply(reply, 7), ("192.0.2.1", 40000), ("198.51.100.2", 80)) == 1000
    assert established_owner(parse_reply(reply, 7), ("192.0.2.1", 40001), ("198.51.100.2", 80)) is None
    assert established_owner(parse_reply(reply, 7), ("192.0.2.1", 40000), ("198.51.100.3", 80)) is None


def test_an_ipv6_socket_with_v4_mapped_addresses_answers_an_ipv4_lookup() -> None:
    """The client's own socket may be AF_INET6 connected to ::ffff:a.b.c.d; the kernel finds
    it by the IPv4 lookup and describes it as AF_INET6."""
    mapped = bytes.fromhex("00000000000000000000ffff")
    reply = _reply(inet_diag.AF_INET6, TcpState.ESTABLISHED, mapped + bytes([192, 0, 2, 1]), 40000,
                   mapped + bytes([198, 51, 100, 2]), 80, 1000, 5)
    assert established_owner(parse_reply(reply, 7), ("192.0.2.1", 40000), ("198.51.100.2", 80)) == 1000
    assert established_owner(parse_reply(reply, 7), ("::ffff:192.0.2.1", 40000), ("198.51.100.2", 80)) == 1000


def test_ipv6_entry() -> None:
    src, dst = bytes.fromhex("20010db8000100000000000000000001"), bytes.fromhex("20010db8000200000000000000000002")
    reply = _reply(inet_diag.AF_INET6, TcpState.ESTABLISHED, src, 40000, dst, 443, 1000, 5)
    assert established_owner(parse_reply(reply, 7), ("2001:db8:1::1", 40000), ("2001:db8:2::2", 443)) == 1000


@pytest.mark.parametrize("data", [b"", ESTABLISHED_REPLY[:15], ESTABLISHED_REPLY[:60], ESTABLISHED_REPLY[:100],
                                  struct.pack("=IHHII", 8, 20, 0, 7, 0),
                                  struct.pack("=IHHII", 16, 99, 0, 7, 0),
                                  _reply(7, 1, b"", 1, b"", 2, 3, 4)])
def test_malformed_replies_are_errors_not_owners(data: bytes) -> None:
    """Truncated, too short for an inet_diag_msg, an unknown type or address family."""
    with pytest.raises(inet_diag.DiagError):
        parse_reply(data, 7)


def test_a_reply_to_another_request_is_refused() -> None:
    with pytest.raises(inet_diag.DiagError):
        parse_reply(ESTABLISHED_REPLY, 8)


# -- the fallback for a source port that NAT changed -------------------------

FILTER_V4 = bytes.fromhex(
    "07" "10" "2400"  # S_COND, yes: next op (16 bytes on), no: 36 = past the end + 4 (rejected)
    "02" "20" "0000" "ffffffff" "7f000001"  # AF_INET, /32, pad, any port, 127.0.0.1
    "08" "10" "1400"  # D_COND, yes: the end (accepted), no: 20 = past the end + 4
    "02" "20" "0000" "87920000" "7f000001")  # AF_INET, /32, pad, port 37511 (host order), 127.0.0.1
DUMP_REQUEST = bytes.fromhex(
    "70000000" "1200" "0103" "07000000" "00000000"  # 112 bytes, TCPDIAG_GETSOCK, REQUEST|DUMP, seq 7
    "00" "00" "00" "00"  # AF_UNSPEC (both families), src_len, dst_len, no extensions
    "0000" "9287" + "00" * 32 + "00000000" "ffffffff" "ffffffff"  # any sport, dport 37511, no cookie
    "360b0000" "00000000"  # states: the voting states (0xb36), dbs
    "2400" "0100") + FILTER_V4  # the INET_DIAG_REQ_BYTECODE attribute
DUMP_REPLY = bytes.fromhex(
    "7c000000120002000700000020390000020100009c4092877f0000010000000000000000000000007f0000010000000000000000"
    "0000000000000000e41b000000000000000000000000000000000000000000003fad0a00050008000000000008000f0000000000"
    "0c001500010000000000000006001600520000007c0000001200020007000000203900000a0100009c4192870000000000000000"
    "0000ffff7f00000100000000000000000000ffff7f00000100000000e51b000000000000000000000000000000000000000000004"
    "1ad0a00050008000000000008000f00000000000c00150001000000000000000600160012000000")
DUMP_DONE = bytes.fromhex("1400000003000200070000002039000000000000")
DUMP_EINVAL = bytes.fromhex(
    "80000000020000000800000020390000eaffffff6c0000001200010308000000000000000000000000009287000000000000000000"
    "000000000000000000000000000000000000000000000000000000ffffffffffffffff360b000000000000200001000710240002"
    "200000ffffffff7f000001081014000220000087920000")
DEST = ("127.0.0.1", 37511)


def test_flow_filter_is_peer_address_any_port_then_destination_byte_for_byte() -> None:
    """Two host conditions; every "no" jumps 4 bytes past the end, which the kernel rejects."""
    assert flow_filter("127.0.0.1", DEST) == FILTER_V4
    assert flow_filter("::ffff:127.0.0.1", ("::ffff:127.0.0.1", 37511)) == FILTER_V4


def test_ipv6_flow_filter_carries_the_whole_addresses() -> None:
    bc = flow_filter("2001:db8:1::1", ("2001:db8:2::2", 443))
    assert len(bc) == 2 * 28
    assert bc[:4] == bytes.fromhex("071c3c00") and bc[28:32] == bytes.fromhex("081c2000")
    assert bc[4:12] == bytes.fromhex("0a800000ffffffff") and bc[32:40] == bytes.fromhex("0a800000bb010000")
    assert bc[12:28] == bytes.fromhex("20010db8000100000000000000000001")
    assert bc[40:56] == bytes.fromhex("20010db8000200000000000000000002")


@pytest.mark.parametrize("peer, dest", [("192.0.2.1", ("2001:db8::2", 80)), ("not an ip", ("192.0.2.2", 80))])
def test_no_filter_for_a_flow_no_socket_can_have(peer: str, dest: tuple[str, int]) -> None:
    with pytest.raises(ValueError):
        flow_filter(peer, dest)


def test_dump_request_is_the_one_the_kernel_answered_byte_for_byte() -> None:
    """TCPDIAG_GETSOCK with AF_UNSPEC: one walk of the table for both socket families."""
    assert dump_request(37511, FILTER_V4, 7) == DUMP_REQUEST


def test_dump_reply_names_both_families_and_ends_with_done() -> None:
    """The AF_INET6 client connected to ::ffff:127.0.0.1 is listed in IPv4 spelling."""
    entries, done = parse_dump(DUMP_REPLY, 7)
    assert not done
    assert entries == [Entry(TcpState.ESTABLISHED, ("127.0.0.1", 40000), DEST, 0, 699711),
                       Entry(TcpState.ESTABLISHED, ("127.0.0.1", 40001), DEST, 0, 699713)]
    assert parse_dump(DUMP_DONE, 7) == ([], True)
    assert parse_dump(DUMP_REPLY + DUMP_DONE, 7) == (entries, True)


@pytest.mark.parametrize("data", [DUMP_EINVAL, DUMP_REPLY[:100], DUMP_REPLY[:130], DUMP_REPLY + b"\0" * 8,
                                  struct.pack("=IHHIIi", 20, 3, 2, 7, 0, -12),
                                  ESTABLISHED_REPLY])
def test_malformed_or_refused_dumps_are_errors_not_owners(data: bytes) -> None:
    """The kernel's EINVAL, truncated messages, trailing bytes, an error in NLMSG_DONE, and a
    message of the exact lookup's type."""
    with pytest.raises(inet_diag.DiagError):
        parse_dump(data, 7)


def test_a_dump_for_another_request_is_refused() -> None:
    with pytest.raises(inet_diag.DiagError):
        parse_dump(DUMP_REPLY, 8)


PEER = "192.0.2.1"
FLOW_DEST = ("198.51.100.2", 8102)


def _match(uid: int, state: TcpState = TcpState.ESTABLISHED, inode: int = 5, sport: int = 40000,
           src: str = PEER, dst: tuple[str, int] = FLOW_DEST) -> Entry:
    return Entry(state, (src, sport), dst, uid, inode)


def test_one_live_match_names_its_owner() -> None:
    """The bug: NAT gave the client another source port; its own socket is the one match."""
    assert agreed_owner([_match(1000)], PEER, FLOW_DEST) == 1000
    assert agreed_owner([_match(1000)], "::ffff:" + PEER, FLOW_DEST) == 1000


def test_matches_that_agree_name_their_owner() -> None:
    """Several connections of one user, some closing, old ones in TIME_WAIT (uid 0, no vote)."""
    entries = [_match(1000), _match(1000, sport=40001), _match(1000, TcpState.FIN_WAIT2, inode=0, sport=40002),
               _match(0, TcpState.TIME_WAIT, inode=0, sport=40003)]
    assert agreed_owner(entries, PEER, FLOW_DEST) == 1000


def test_matches_that_disagree_are_unknown() -> None:
    """Two users behind the same address and destination: either could be ours."""
    assert agreed_owner([_match(1000), _match(1001, sport=40001)], PEER, FLOW_DEST) is None


def test_a_closing_socket_of_another_user_vetoes() -> None:
    """Our own client may have half-closed already: another user's live socket must not speak for it."""
    for state in (TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.CLOSE_WAIT, TcpState.SYN_SENT):
        entries = [_match(1000), _match(1001, state, inode=0, sport=40001)]
        assert agreed_owner(entries, PEER, FLOW_DEST) is None, state


@pytest.mark.parametrize("entries", [[], [_match(1000, inode=0)], [_match(1000, TcpState.FIN_WAIT2)],
                                     [_match(0, TcpState.TIME_WAIT, inode=0)]],
                         ids=["none", "no process", "closing", "time-wait"])
def test_no_live_match_is_unknown_never_root(entries: list[Entry]) -> None:
    assert agreed_owner(entries, PEER, FLOW_DEST) is None


def test_entries_of_other_flows_do_not_vote() -> None:
    entries = [_match(1000), _match(1001, src="192.0.2.9"), _match(1001, dst=("198.51.100.2", 8101)),
               _match(1001, dst=("198.51.100.3", 8102))]
    assert agreed_owner(entries, PEER, FLOW_DEST) == 1000
    assert agreed_owner(entries[1:], PEER, FLOW_DEST) is None


def test_too_many_matches_are_unknown() -> None:
    entries = [_match(1000, sport=40000 + i) for i in range(inet_diag.MAX_MATCHES + 1)]
    assert agreed_owner(entries, PEER, FLOW_DEST) is None
    assert agreed_owner(entries[:-1], PEER, FLOW_DEST) == 1000

