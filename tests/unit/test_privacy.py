"""Destinations scrub themselves unless display was turned on."""

from __future__ import annotations

import logging
from typing import Iterator

import pytest

from metaproxy.privacy import SCRUBBED, Destination, show_destinations


@pytest.fixture(autouse=True)
def hidden() -> Iterator[None]:
    show_destinations(False)
    yield
    show_destinations(False)


def test_every_formatting_path_is_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    dest = Destination("198.51.100.2", 8443)
    texts = [str(dest), repr(dest), f"{dest}", f"{dest!r}", "%s" % dest, "{}".format(dest),
             str([dest]), str({"d": dest})]
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("to %s", dest)
    texts.append(caplog.text)
    for text in texts:
        assert "198.51.100.2" not in text and "8443" not in text
        assert SCRUBBED in text


def test_display_when_asked() -> None:
    show_destinations(True)
    assert str(Destination("198.51.100.2", 80)) == "198.51.100.2:80"
    assert str(Destination("2001:db8::2", 80)) == "[2001:db8::2]:80"
