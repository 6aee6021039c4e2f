"""The contract every upstream handshake keeps with its driver (metaproxy.protocol.handshake).

Each protocol module has one class the driver uses the same way: first(), then
receive() with at most ``want`` bytes, until Done. Refused and Violation are the
only ways to fail, and credentials longer than the wire allows are refused,
never truncated.
"""

from __future__ import annotations

import pytest

from metaproxy.protocol.handshake import MAX_REPLY, NEED_MORE, Done, Refused, Send, Violation, check_credential
from metaproxy.protocol.http_connect import HttpConnect
from metaproxy.protocol.socks4 import Socks4
from metaproxy.protocol.socks5 import Socks5

# Each machine with a complete successful reply, followed by payload for the client.
MACHINES = {
    "socks5": (lambda: Socks5("198.51.100.2", 80), b"\x05\x00", b"\x05\x00\x00\x01" + bytes(6)),
    "socks4": (lambda: Socks4("198.51.100.2", 80), b"", b"\x00\x5a" + bytes(6)),
    "http": (lambda: HttpConnect("198.51.100.2", 80), b"", b"HTTP/1.1 200 OK\r\n\r\n"),
}


def _drive(machine: object, replies: bytes) -> tuple[list[bytes], object]:
    """Feed the replies as a driver would, never more than ``want`` at a time."""
    sent, step = [], None
    while replies and not isinstance(step, Done):
        want = machine.want  # type: ignore[attr-defined]
        assert 0 < want <= MAX_REPLY
        chunk, replies = replies[:want], replies[want:]
        step = machine.receive(chunk)  # type: ignore[attr-defined]
        if isinstance(step, Send):
            sent.append(step.data)
    return sent, step


@pytest.mark.parametrize("kind", sorted(MACHINES))
def test_each_machine_opens_reads_within_want_and_ends_done(kind: str) -> None:
    """first() has bytes to send; fed within ``want``, the reply ends in Done and
    ``want`` falls to 0."""
    make, greeting, reply = MACHINES[kind]
    machine = make()
    assert machine.first()
    _, step = _drive(machine, greeting + reply)
    assert step == Done(b"") and machine.want == 0


def test_need_more_is_one_object_that_reads_as_its_name() -> None:
    assert repr(NEED_MORE) == "NEED_MORE"
    assert Socks4("198.51.100.2", 80).receive(b"\x00") is NEED_MORE


def test_refused_carries_the_code_and_its_text() -> None:
    refusal = Refused(0x04, "host unreachable (0x04)")
    assert refusal.code == 0x04 and refusal.reason == str(refusal) == "host unreachable (0x04)"


def test_a_violation_is_a_value_error() -> None:
    assert issubclass(Violation, ValueError)


def test_credentials_of_up_to_255_bytes_pass_and_longer_ones_are_refused_not_truncated() -> None:
    assert check_credential("SOCKS5 username", b"u" * 255) == b"u" * 255
    with pytest.raises(ValueError, match="the SOCKS5 username is 256 bytes long; at most 255 fit"):
        check_credential("SOCKS5 username", b"u" * 256)
