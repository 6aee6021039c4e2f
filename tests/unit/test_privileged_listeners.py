"""bind_listeners(): the only sockets the daemon binds, with the options the relay relies on."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest

from metaproxy.errors import StartupError
from metaproxy.privileged import bind_listeners, drop_privileges
from tests.unit.forked import in_child, require_root

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


@pytest.fixture
def port() -> int:
    """A port free on 127.0.0.1 and ::1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listeners(port: int) -> Iterator[list[socket.socket]]:
    socks = bind_listeners(["127.0.0.1", "::1"], port, transparent=False)
    yield socks
    for s in socks:
        s.close()


def test_each_address_gets_a_listener_of_its_family(listeners: list[socket.socket], port: int) -> None:
    """IPv4 and IPv6 literals give AF_INET and AF_INET6 sockets, bound to that address and port."""
    assert [(s.family, s.getsockname()[:2]) for s in listeners] == [
        (socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port))]


def test_listeners_have_the_options_the_relay_relies_on(listeners: list[socket.socket]) -> None:
    """Listening, SO_REUSEADDR, non-blocking, close-on-exec; IPv6 is V6ONLY; not transparent."""
    for s in listeners:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert s.getblocking() is False and s.get_inheritable() is False
    v4, v6 = listeners
    assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert v4.getsockopt(socket.SOL_IP, IP_TRANSPARENT) == 0
    assert v6.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT) == 0


def test_listen_backlog_is_large(listeners: list[socket.socket], port: int) -> None:
    """The backlog is 4096, or the kernel's net.core.somaxconn if that is lower; ss shows
    it as the Send-Q of a listening socket."""
    with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
        expected = min(4096, int(f.read()))
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    assert [int(line.split()[2]) for line in out.splitlines()] == [expected, expected], out


def test_bracketed_ipv6_literal_is_accepted(port: int) -> None:
    """'[::1]' is the same address as '::1'."""
    socks = bind_listeners(["[::1]"], port, transparent=False)
    try:
        assert socks[0].getsockname()[:2] == ("::1", port)
    finally:
        socks[0].close()


def test_transparent_sets_ip_transparent_for_each_family(port: int) -> None:
    """For TPROXY, IPv4 listeners get IP_TRANSPARENT and IPv6 ones IPV6_TRANSPARENT (root)."""
    require_root()
    v4, v6 = bind_listeners(["127.0.0.1", "::1"], port, transparent=True)
    try:
        assert v4.getsockopt(socket.SOL_IP, IP_TRANSPARENT) == 1
        assert v6.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT) == 1
    finally:
        v4.close()
        v6.close()


def test_transparent_without_cap_net_admin_names_the_remedy(port: int) -> None:
    """After a drop, IP_TRANSPARENT fails with EPERM and the error says it needs CAP_NET_ADMIN."""
    def body() -> str:
        drop_privileges("nobody")
        try:
            bind_listeners(["127.0.0.1"], port, transparent=True)
        except StartupError as exc:
            return str(exc)
        return "bound"
    outcome = in_child(body)
    assert outcome.ok, outcome
    assert "127.0.0.1" in outcome.value and "EPERM" in outcome.value, outcome
    assert "CAP_NET_ADMIN" in outcome.value, outcome


def test_address_in_use_names_the_address_and_a_remedy_and_binds_none(port: int) -> None:
    """EADDRINUSE names the address, the errno and how to find the other listener; the
    listeners bound before the failure are closed again (all or none)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(StartupError) as caught:
            bind_listeners(["::1", "127.0.0.1"], port, transparent=False)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "EADDRINUSE" in message and "ss -ltnp" in message
    with socket.socket(socket.AF_INET6) as again:  # ::1 was released
        again.bind(("::1", port))


def test_address_on_no_interface_says_so(port: int) -> None:
    """An address that no interface has (RFC 5737 TEST-NET) gives EADDRNOTAVAIL and the remedy."""
    with pytest.raises(StartupError, match=r"192\.0\.2\.254.*EADDRNOTAVAIL.*no interface has"):
        bind_listeners(["192.0.2.254"], port, transparent=False)


@pytest.mark.parametrize("address", ["localhost", "example.org", "127.0.0.1:80", ""])
def test_names_are_refused_never_resolved(address: str, port: int) -> None:
    """Only IP literals are bound: a name is refused, not looked up."""
    with pytest.raises(StartupError, match="not an IPv4 or IPv6 literal"):
        bind_listeners([address], port, transparent=False)


@pytest.mark.parametrize("addresses, port_number", [([], 8675), ("127.0.0.1", 8675),
                                                    (["127.0.0.1"], 0), (["127.0.0.1"], 65536)])
def test_nothing_to_bind_or_a_bad_port_is_refused(addresses: list[str], port_number: int) -> None:
    """An empty list, a bare string (not a list of addresses) and ports outside 1-65535."""
    with pytest.raises(StartupError):
        bind_listeners(addresses, port_number, transparent=False)
