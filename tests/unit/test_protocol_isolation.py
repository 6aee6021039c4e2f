"""Isolation credentials (metaproxy.protocol.isolation), per mode, with no I/O.

Tor keeps streams with different SOCKS credentials on different circuits, so
the credentials decide which connections may share one: fresh ones for every
connection, one set per destination, per client user (uid) or per client
address (Tor's IsolateClientAddr), or none at all.
"""

from __future__ import annotations

from metaproxy.config.model import Isolation
from metaproxy.protocol.isolation import TOR_RESERVED_PREFIX, Isolator

WEB = ("198.51.100.2", 80)


def test_isolation_connection_makes_fresh_credentials_every_time() -> None:
    iso = Isolator(Isolation.CONNECTION)
    a, b = iso.credentials("198.51.100.2", 80, 1000), iso.credentials("198.51.100.2", 80, 1000)
    assert a is not None and b is not None and a != b


def test_isolation_destination_shares_per_destination_only() -> None:
    iso = Isolator(Isolation.DESTINATION, secret=b"k" * 32)
    assert iso.credentials("198.51.100.2", 80, 1) == iso.credentials("198.51.100.2", 80, 2)
    assert iso.credentials("198.51.100.2", 80, 1) != iso.credentials("198.51.100.2", 443, 1)
    creds = iso.credentials("198.51.100.2", 80, 1)
    assert creds is not None and "198.51.100.2" not in creds[0] + creds[1]


def test_isolation_user_shares_per_uid_and_isolates_unknown_uids() -> None:
    iso = Isolator(Isolation.USER, secret=b"k" * 32)
    assert iso.credentials("198.51.100.2", 80, 1000) == iso.credentials("203.0.113.9", 22, 1000)
    assert iso.credentials("198.51.100.2", 80, 1000) != iso.credentials("198.51.100.2", 80, 1001)
    assert iso.credentials("198.51.100.2", 80, None) != iso.credentials("198.51.100.2", 80, None)


def test_isolation_none_sends_no_credentials_and_names_avoid_tor_prefix() -> None:
    assert Isolator(Isolation.NONE).credentials("198.51.100.2", 80, 0) is None
    for mode in (Isolation.CONNECTION, Isolation.DESTINATION, Isolation.USER):
        creds = Isolator(mode).credentials("198.51.100.2", 80, 0)
        assert creds is not None and not creds[0].startswith(TOR_RESERVED_PREFIX)
        assert len(creds[0]) <= 255 and len(creds[1]) <= 255


# ---- isolation = user: unknown owners and root ----

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


# ---- isolation = client: one set of credentials per client address ----

def test_one_client_keeps_its_credentials_across_destinations() -> None:
    iso = Isolator(Isolation.CLIENT, secret=b"k" * 32)
    assert iso.credentials(*WEB, None, client="203.0.113.11") == \
        iso.credentials("2001:db8:2::2", 443, 0, client="203.0.113.11")


def test_two_clients_never_share_credentials() -> None:
    iso = Isolator(Isolation.CLIENT, secret=b"k" * 32)
    seen = {iso.credentials(*WEB, None, client=f"203.0.113.{n}") for n in range(1, 200)}
    assert len(seen) == 199


def test_a_v4_mapped_address_is_the_same_client_as_its_ipv4_form() -> None:
    iso = Isolator(Isolation.CLIENT, secret=b"k" * 32)
    assert iso.credentials(*WEB, None, client="::ffff:203.0.113.11") == \
        iso.credentials(*WEB, None, client="203.0.113.11")


def test_an_ipv6_client_is_another_client_than_its_ipv4_address() -> None:
    iso = Isolator(Isolation.CLIENT, secret=b"k" * 32)
    assert iso.credentials(*WEB, None, client="2001:db8:3::11") != \
        iso.credentials(*WEB, None, client="203.0.113.11")


def test_an_unknown_client_gets_fresh_credentials_every_time() -> None:
    iso = Isolator(Isolation.CLIENT, secret=b"k" * 32)
    for client in (None, "", "not an address"):
        assert iso.credentials(*WEB, None, client=client) != iso.credentials(*WEB, None, client=client)


def test_the_credentials_change_with_the_secret_so_a_restart_gives_new_circuits() -> None:
    a, b = Isolator(Isolation.CLIENT, secret=b"a" * 32), Isolator(Isolation.CLIENT, secret=b"b" * 32)
    assert a.credentials(*WEB, None, client="203.0.113.11") != b.credentials(*WEB, None, client="203.0.113.11")


def test_user_isolation_of_a_remote_client_falls_back_to_fresh_credentials() -> None:
    """A LAN client has no local socket: the uid lookup finds none, and no two connections share."""
    iso = Isolator(Isolation.USER, secret=b"k" * 32)
    assert iso.credentials(*WEB, None, client="203.0.113.11") != iso.credentials(*WEB, None, client="203.0.113.11")


def test_other_modes_ignore_the_client_address() -> None:
    iso = Isolator(Isolation.DESTINATION, secret=b"k" * 32)
    assert iso.credentials(*WEB, None, client="203.0.113.11") == iso.credentials(*WEB, None, client="203.0.113.12")
    assert Isolator(Isolation.NONE).credentials(*WEB, None, client="203.0.113.11") is None
