"""SOCKS credentials that make Tor keep streams apart (IsolateSOCKSAuth).

Tor puts streams with different SOCKS username/password on different circuits.
The isolation unit decides which streams may share: each connection, each
destination, each local user, or all of them.
"""

from __future__ import annotations

import hashlib
import hmac
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

    def credentials(self, dest_ip: str, dest_port: int, uid: int | None) -> tuple[str, str] | None:
        """(username, password) for one connection, or None for isolation = none.

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
        elif uid is not None:
            token = self._mac(f"uid|{uid}")
        else:
            # The owner is unknown (gone, not local, not ESTABLISHED, a failed
            # lookup): isolate more, never less.
            token = secrets.token_hex(16)
        username = _PREFIX + token
        if username.startswith(TOR_RESERVED_PREFIX):
            raise ValueError("a generated SOCKS username must not start with " + TOR_RESERVED_PREFIX)
        return username, token

    def _mac(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()[:32]
