"""SOCKS credentials that make Tor keep streams apart (IsolateSOCKSAuth).

Tor puts streams with different SOCKS username/password on different circuits.
The isolation units decide which streams may share: each connection, each
destination, each local user, each client address (a LAN client behind a
gateway, like Tor's IsolateClientAddr), a combination of the last three
(``user, destination``: one circuit per user and site), or all of them.

With a rotation period (like Tor's MaxCircuitDirtiness) the number of the
current period is part of the HMAC input: when it ticks over, every key
changes and Tor builds fresh circuits for new streams. Open streams keep
theirs.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable

from metaproxy.config.model import Isolation, IsolationRule
from metaproxy.protocol import address

# Tor 0.4.9 gives usernames starting with "<torS0X>" a meaning of its own
# (extended SOCKS parameters). Every generated name starts with this prefix
# instead, so none can (tests/unit/test_protocol_isolation.py checks it).
TOR_RESERVED_PREFIX = "<torS0X>"
_PREFIX = "mp-"


class Isolator:
    """Makes (username, password) for one upstream's isolation rule.

    ``secret`` keys the HMAC so the credentials for a destination or a uid
    cannot be guessed, and change when the daemon restarts. ``clock`` (seconds,
    monotonic) numbers the rotation periods. A single ``Isolation`` is taken
    as a rule of that unit alone that never rotates.
    """

    __slots__ = ("mode", "_secret", "_clock", "_none", "_fresh", "_dest", "needs_client", "needs_owner")

    def __init__(self, mode: IsolationRule | Isolation, secret: bytes | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode if isinstance(mode, IsolationRule) else IsolationRule(frozenset({mode}))
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._clock = clock
        # The rule's units, read once: this runs per connection, and testing
        # an Enum member's presence in a set costs a Python call each time.
        rule = self.mode
        self._none = rule.has(Isolation.NONE)
        self._fresh = rule.has(Isolation.CONNECTION) or not rule.units
        self._dest = rule.has(Isolation.DESTINATION)
        self.needs_client = rule.has(Isolation.CLIENT)  # the caller passes the client's address only then
        self.needs_owner = rule.has(Isolation.USER)  # the caller looks up the owner only then

    def credentials(self, dest_ip: str, dest_port: int, uid: int | None,
                    client: str | None = None) -> tuple[str, str] | None:
        """(username, password) for one connection, or None for isolation = none.

        ``client`` is the client's address as the accepted socket sees it
        (isolation = client); None, or a text that is not an address, gets a
        fresh token. An IPv4-mapped IPv6 address counts as the IPv4 address,
        so a dual-stack listener does not split one client in two.

        ``uid`` is the owner of the client's live, ESTABLISHED socket, or None
        when it is unknown (metaproxy.kernel.peer_owner). None gets a fresh
        token, as in isolation = connection: never a shared one, and never
        root's. A uid of 0 is trusted like any other, because the lookup only
        returns it for a live socket that root opened: root's own connections
        share root's token, as every user's do. The bug this guards against
        was a gone client's entry (TIME_WAIT, uid 0) read as root's.
        """
        if self._none:
            return None
        parts = self._parts(dest_ip, dest_port, uid, client)
        # The owner is unknown (gone, a LAN client behind a gateway, not
        # ESTABLISHED, a failed lookup), or the client's address is, or the
        # unit is the connection: fresh credentials. Isolate more, never less.
        token = secrets.token_hex(16) if parts is None else self._mac("|".join(parts))
        return _PREFIX + token, token

    def _parts(self, dest_ip: str, dest_port: int, uid: int | None, client: str | None) -> list[str] | None:
        """The HMAC input, unit by unit in a fixed order; None where a fresh token is due."""
        if self._fresh:
            return None
        parts = []
        if self._dest:
            parts.append(f"dest|{dest_ip}|{dest_port}")
        if self.needs_client:
            client_ip = _client_address(client)
            if client_ip is None:
                return None
            parts.append(f"client|{client_ip}")
        if self.needs_owner:
            if uid is None:
                return None
            parts.append(f"uid|{uid}")
        period = self.mode.period
        if period:
            parts.append(f"period|{int(self._clock() // period)}")
        return parts

    def _mac(self, text: str) -> str:
        # The one-shot hmac.digest: the same bytes as hmac.new(), without a
        # Python HMAC object per connection.
        return hmac.digest(self._secret, text.encode(), "sha256").hex()[:32]


def _client_address(text: str | None) -> str | None:
    """The canonical form of a client address; IPv4-mapped IPv6 as IPv4. None if unusable."""
    if text is None:
        return None
    try:
        return address.canonical(text)
    except ValueError:
        return None
