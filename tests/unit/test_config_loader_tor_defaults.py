"""Defaults that suit Tor, as the loader reads them: connect_timeout 120 s for socks5 and 10 s
for the other types unless [daemon] or the upstream sets it; isolation per user and destination,
rotating every 600 s, its units combined with commas; and [daemon] groups, deduplicated."""

from __future__ import annotations

import pathlib

import pytest

from metaproxy.config import load
from metaproxy.config.model import Isolation
from metaproxy.errors import ConfigError

UPSTREAMS = """
[upstreams]
    [[tor]]
    type = socks5
    address = 127.0.0.1:9050
    [[squid]]
    type = http
    address = 192.0.2.2:3128
[routes]
80 = squid
* = tor
"""


def _load(tmp_path: pathlib.Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "m.conf"
    path.write_text(text)
    return load(str(path))


def _problems(tmp_path: pathlib.Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    return caught.value.problems


def test_connect_timeout_defaults_by_type_socks5_120_others_10(tmp_path: pathlib.Path) -> None:
    config = _load(tmp_path, UPSTREAMS)
    assert config.upstreams["tor"].connect_timeout == 120 and config.upstreams["squid"].connect_timeout == 10
    assert config.daemon.connect_timeout is None


def test_an_explicit_daemon_connect_timeout_beats_the_type_default(tmp_path: pathlib.Path) -> None:
    config = _load(tmp_path, "[daemon]\nconnect_timeout = 30\n" + UPSTREAMS)
    assert config.upstreams["tor"].connect_timeout == 30 and config.upstreams["squid"].connect_timeout == 30


def test_the_upstream_key_beats_daemon_and_type(tmp_path: pathlib.Path) -> None:
    text = "[daemon]\nconnect_timeout = 30\n" + UPSTREAMS.replace(
        "address = 127.0.0.1:9050\n", "address = 127.0.0.1:9050\n    connect_timeout = 200\n")
    assert _load(tmp_path, text).upstreams["tor"].connect_timeout == 200


def test_isolation_defaults_to_user_and_destination_rotating_every_600s(tmp_path: pathlib.Path) -> None:
    rule = _load(tmp_path, UPSTREAMS).upstreams["tor"].isolation
    assert rule.units == {Isolation.USER, Isolation.DESTINATION} and rule.period == 600


@pytest.mark.parametrize("text, units, period", [
    ("isolation = client, destination\n    isolation_period = 0", {Isolation.CLIENT, Isolation.DESTINATION}, 0),
    ("isolation = user", {Isolation.USER}, 600),
    ("isolation = connection", {Isolation.CONNECTION}, 0),
    ("isolation = none\n    isolation_period = 60", {Isolation.NONE}, 0),
])
def test_isolation_units_combine_and_the_period_is_read(tmp_path: pathlib.Path, text: str,
                                                         units: set[Isolation], period: int) -> None:
    config = _load(tmp_path, UPSTREAMS.replace("address = 127.0.0.1:9050\n",
                                               f"address = 127.0.0.1:9050\n    {text}\n"))
    rule = config.upstreams["tor"].isolation
    assert (rule.units, rule.period) == (units, period)


@pytest.mark.parametrize("value, expected", [
    ("connection, destination", "connection alone"),
    ("none, user", "none alone"),
    ("user, sometimes", "'sometimes'"),
])
def test_a_wrong_isolation_is_named_with_its_line(tmp_path: pathlib.Path, value: str, expected: str) -> None:
    problems = _problems(tmp_path, UPSTREAMS.replace("address = 127.0.0.1:9050\n",
                                                     f"address = 127.0.0.1:9050\n    isolation = {value}\n"))
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path}/m.conf:6: [upstreams][[tor]] isolation:"), \
        problems
    assert expected in problems[0], problems


def test_groups_are_read_deduplicated_and_checked_as_names(tmp_path: pathlib.Path) -> None:
    config = _load(tmp_path, "[daemon]\ngroups = debian-tor, debian-tor, adm\n" + UPSTREAMS)
    assert config.daemon.groups == ("debian-tor", "adm")
    assert config.where(("daemon",), "groups") == f"{tmp_path}/m.conf:2"
    problems = _problems(tmp_path, "[daemon]\ngroups = 112, a b\n" + UPSTREAMS)
    assert [p.split(": ", 1)[0] for p in problems] == [f"{tmp_path}/m.conf:2"] * 2, problems
    assert "a group name" in problems[0], problems
