"""isolation = client: one set of SOCKS credentials per client address (Tor's IsolateClientAddr)."""

from __future__ import annotations

from metaproxy.config.model import Isolation
from metaproxy.protocol.isolation import Isolator

WEB = ("198.51.100.2", 80)


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
