"""SOCKS credentials that make Tor keep streams apart (IsolateSOCKSAuth).

Tor puts streams with different SOCKS username/password on different circuits.
The isolation unit decides which streams may share: each connection, each
destination, each local user, each client address (a LAN client behind a
gateway, like Tor's IsolateClientAddr), or all of them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets

from metaproxy.config.model import Isolation

# Tor 0.4.9 gives usernames starting with this a meaning of its own (extended
# SOCKS parameters); a generated name must never start with it.
TOR_RESERVED_PREFIX = "<torS0X>"
_PREFIX = "mp-"


class Isolator:
    """Makes (username, password) for one upstream's isolation mode.

    ``secret`` keys the HMAC so the credentials for a destination or a uid
    cannot be guessed, and change when the daemon restarts.
    """

    __slots__ = ("mode", "_secret")

    def __init__(self, mode: Isolation, secret: bytes | None = None) -> None:
        self.mode = mode
        self._secret = secret if secret is not None else secrets.token_bytes(32)

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
        if self.mode is Isolation.NONE:
            return None
        if self.mode is Isolation.CONNECTION:
            token = secrets.token_hex(16)
        elif self.mode is Isolation.DESTINATION:
            token = self._mac(f"dest|{dest_ip}|{dest_port}")
        elif self.mode is Isolation.CLIENT and (address := _client_address(client)) is not None:
            token = self._mac(f"client|{address}")
        elif self.mode is Isolation.USER and uid is not None:
            token = self._mac(f"uid|{uid}")
        else:
            # The owner is unknown (gone, a LAN client behind a gateway, not
            # ESTABLISHED, a failed lookup), or the client's address is: isolate
            # more, never less.
            token = secrets.token_hex(16)
        username = _PREFIX + token
        if username.startswith(TOR_RESERVED_PREFIX):
            raise ValueError("a generated SOCKS username must not start with " + TOR_RESERVED_PREFIX)
        return username, token

    def _mac(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()[:32]


def _client_address(text: str | None) -> str | None:
    """The canonical form of a client address; IPv4-mapped IPv6 as IPv4. None if unusable."""
    if text is None:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
