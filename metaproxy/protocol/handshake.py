"""What every upstream handshake says to the code that drives it.

Each protocol module (socks5, socks4, http_connect) is a state machine with no
I/O. The driver sends ``first()``, then reads at most ``want`` bytes at a time
and hands them to ``receive()``, which answers with one of:

- ``Send(data)``: write these bytes, then keep reading;
- ``NEED_MORE``: nothing to write, keep reading (``want`` says how much);
- ``Done(payload)``: the tunnel is open; ``payload`` arrived after the reply
  and belongs to the client, before anything else the upstream sends;

or raises ``Refused`` (the upstream answered with a failure code) or
``Violation`` (the reply broke the protocol). Their texts never quote the
upstream's bytes, which may echo the destination, and never name the
destination: the driver adds the upstream's name and logs them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Bytes the driver may read from a failed or hostile upstream before giving
# up: no reply of ours legitimately comes close.
MAX_REPLY = 16 * 1024


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Done:
    payload: bytes = b""


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = _NeedMore()
Step = Send | Done | _NeedMore


class Refused(Exception):
    """The upstream refused the CONNECT with ``code``, whose text is in ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Violation(ValueError):
    """The upstream's bytes are not a valid reply; the text says which rule they broke."""


class Handshake(Protocol):
    """The interface the driver uses; each protocol module has one class with it."""

    @property
    def want(self) -> int:
        """The most bytes to read next: never past the end of the reply (HTTP aside)."""
        ...

    def first(self) -> bytes:
        """What the client sends as soon as the connection is up."""
        ...

    def receive(self, data: bytes) -> Step:
        ...


class CredentialError(ValueError):
    """A credential the protocol cannot carry (too long, a NUL in a SOCKS4 user id): the config's fault.

    Its own type, so that the driver reports exactly these: any other ValueError
    (a malformed destination, which the kernel never gives) may quote the
    address and must not reach a log line.
    """


def check_credential(what: str, value: bytes) -> bytes:
    """RFC 1929 and SOCKS4 carry at most 255 bytes; we refuse more rather than truncate."""
    if len(value) > 255:
        raise CredentialError(f"the {what} is {len(value)} bytes long; at most 255 fit in the handshake")
    return value
