"""isolation = user: what an unknown owner and uid 0 get (issue 11, item 1)."""

from __future__ import annotations

from metaproxy.config.model import Isolation
from metaproxy.protocol.isolation import Isolator


def test_an_unknown_owner_gets_a_fresh_token_never_root_s_or_a_shared_one() -> None:
    """None (gone, not ESTABLISHED, failed lookup) isolates the connection on its own: 100 unknown
    owners get 100 different tokens, none of them root's or another uid's."""
    iso = Isolator(Isolation.USER, secret=b"k" * 32)
    known = {iso.credentials("198.51.100.2", 80, uid) for uid in (0, 1000, 65534)}
    unknown = [iso.credentials("198.51.100.2", 80, None) for _ in range(100)]
    assert len(set(unknown)) == 100
    assert not known & set(unknown)


def test_root_s_own_live_connections_share_root_s_token() -> None:
    """uid 0 comes back only for a live socket root opened: it is per-user isolation like any uid."""
    iso = Isolator(Isolation.USER, secret=b"k" * 32)
    assert iso.credentials("198.51.100.2", 80, 0) == iso.credentials("203.0.113.9", 443, 0)
    assert iso.credentials("198.51.100.2", 80, 0) != iso.credentials("198.51.100.2", 80, 1000)
