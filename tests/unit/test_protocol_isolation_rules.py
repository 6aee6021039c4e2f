"""Combined isolation units and the rotation period (metaproxy.protocol.isolation), no I/O."""

from __future__ import annotations

from metaproxy.config.model import DEFAULT_ISOLATION, Isolation, IsolationRule
from metaproxy.protocol.isolation import Isolator

WEB_A, WEB_B = ("198.51.100.2", 80), ("198.51.100.3", 443)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rule(*units: Isolation, period: int = 0) -> IsolationRule:
    return IsolationRule(frozenset(units), period)


def test_user_and_destination_share_only_within_one_user_and_one_site() -> None:
    """isolation = user, destination: the same uid and site share; another site or uid does not."""
    iso = Isolator(_rule(Isolation.USER, Isolation.DESTINATION), secret=b"k" * 32)
    same = iso.credentials(*WEB_A, 1000)
    assert same == iso.credentials(*WEB_A, 1000)
    others = {iso.credentials(*WEB_B, 1000), iso.credentials(*WEB_A, 1001), iso.credentials(*WEB_B, 1001)}
    assert same not in others and len(others) == 3


def test_combined_with_an_unknown_owner_gets_fresh_credentials() -> None:
    """A unit that cannot be keyed (no uid, no client address) isolates more, never less."""
    iso = Isolator(_rule(Isolation.USER, Isolation.DESTINATION), secret=b"k" * 32)
    assert iso.credentials(*WEB_A, None) != iso.credentials(*WEB_A, None)
    client = Isolator(_rule(Isolation.CLIENT, Isolation.DESTINATION), secret=b"k" * 32)
    assert client.credentials(*WEB_A, None, client="203.0.113.11") == \
        client.credentials(*WEB_A, None, client="::ffff:203.0.113.11")
    assert client.credentials(*WEB_A, None, client=None) != client.credentials(*WEB_A, None, client=None)


def test_a_single_unit_keeps_the_credentials_it_had_before_units_combined() -> None:
    """isolation = destination (no period) derives the token it did when units could not be
    combined, so an upgrade keeps existing circuits."""
    import hashlib
    import hmac
    token = hmac.new(b"k" * 32, b"dest|198.51.100.2|80", hashlib.sha256).hexdigest()[:32]
    assert Isolator(Isolation.DESTINATION, secret=b"k" * 32).credentials(*WEB_A, None) == ("mp-" + token, token)


def test_the_period_rotates_every_key_and_holds_within_a_period() -> None:
    """isolation_period = 600: the same user and site share for the period, then get new
    credentials (a fresh Tor circuit), like Tor's MaxCircuitDirtiness."""
    clock = Clock()
    iso = Isolator(_rule(Isolation.USER, Isolation.DESTINATION, period=600), secret=b"k" * 32, clock=clock)
    clock.now = 1200.0
    first = iso.credentials(*WEB_A, 1000)
    clock.now = 1799.0
    assert iso.credentials(*WEB_A, 1000) == first
    clock.now = 1800.0
    second = iso.credentials(*WEB_A, 1000)
    assert second != first
    clock.now = 2399.9
    assert iso.credentials(*WEB_A, 1000) == second


def test_period_zero_never_rotates() -> None:
    clock = Clock()
    iso = Isolator(_rule(Isolation.DESTINATION), secret=b"k" * 32, clock=clock)
    first = iso.credentials(*WEB_A, None)
    clock.now += 10 ** 7
    assert iso.credentials(*WEB_A, None) == first


def test_connection_and_none_ignore_the_period() -> None:
    assert Isolator(_rule(Isolation.NONE, period=600)).credentials(*WEB_A, 0) is None
    iso = Isolator(_rule(Isolation.CONNECTION, period=600))
    assert iso.credentials(*WEB_A, 0) != iso.credentials(*WEB_A, 0)


def test_the_default_rule_is_user_and_destination_every_ten_minutes() -> None:
    assert DEFAULT_ISOLATION == _rule(Isolation.USER, Isolation.DESTINATION, period=600)
    assert str(DEFAULT_ISOLATION) == "destination, user"
