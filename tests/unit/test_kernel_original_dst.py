"""Where a connection was going (metaproxy.kernel.original_dst), on real loopback sockets.

No REDIRECT rule applies here, so conntrack holds no original destination:
under REDIRECT the lookup must refuse with a text that says what to check, and
never answer with getsockname(), which is our own listener. Under TPROXY the
local address is the original destination. The root tier checks a real
REDIRECT (tests/system).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from metaproxy.config.model import RedirectMode
from metaproxy.errors import DestinationUnknown
from metaproxy.kernel.original_dst import original_destination


def _accepted(family: socket.AddressFamily, host: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname()[:2], timeout=5)
    accepted, _ = listener.accept()
    return listener, client, accepted


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
def accepted(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    family, host = request.param
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    sockets = _accepted(family, host)
    try:
        yield sockets[2]
    finally:
        for sock in sockets:
            sock.close()


def test_a_connection_that_was_not_redirected_is_refused_with_a_remedy(accepted: socket.socket) -> None:
    """No conntrack entry: DestinationUnknown (an OSError) that names SO_ORIGINAL_DST and
    asks whether a REDIRECT rule sent the connection; never the listener's own address."""
    with pytest.raises(DestinationUnknown) as caught:
        original_destination(accepted, RedirectMode.REDIRECT)
    text = str(caught.value)
    assert "SO_ORIGINAL_DST" in text and "REDIRECT rule" in text, text
    assert isinstance(caught.value, OSError) and caught.value.__cause__ is not None


def test_tproxy_takes_the_local_address_as_the_destination(accepted: socket.socket) -> None:
    name = accepted.getsockname()
    assert original_destination(accepted, RedirectMode.TPROXY) == (name[0], name[1])
