"""Line numbers for keys and sections (metaproxy.config.lines), which configobj does not keep."""

from __future__ import annotations

import pathlib

import pytest

from metaproxy.config import load
from metaproxy.config.lines import LineIndex
from metaproxy.errors import ConfigError
from tests.unit.config_fixtures import ROUTES, UPSTREAM, write


def _problems(path: pathlib.Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    return caught.value.problems


def test_line_numbers_survive_long_and_odd_lines(tmp_path: pathlib.Path) -> None:
    """The index that gives each key its line is the same linear scan."""
    path = write(tmp_path, "# " + "x" * 100_000 + "\n[daemon]\n\n    " + " " * 5000 + "\n"
                 "port = 99999\n" + UPSTREAM + "    isolation = sometimes\n" + ROUTES)
    found = sorted(int(p.split(":")[1]) for p in _problems(path))
    assert found == [5, 10]


def test_a_key_has_its_own_line_and_falls_back_to_its_sections() -> None:
    """A key the file does not write (a default) is reported at its section's line."""
    index = LineIndex()
    index.add(("daemon",), None, 3)
    index.add(("daemon",), "port", 5)
    assert index.line(("daemon",), "port") == 5
    assert index.line(("daemon",), "user") == 3
    assert index.line(("daemon",)) == 3


def test_the_first_place_a_key_is_written_wins_and_unknown_sections_have_no_line() -> None:
    index = LineIndex()
    index.add(("upstreams", "tor"), "type", 7)
    index.add(("upstreams", "tor"), "type", 9)
    assert index.line(("upstreams", "tor"), "type") == 7
    assert index.line(("upstreams", "tor"), "address") is None
    assert index.line(("routes",)) is None
