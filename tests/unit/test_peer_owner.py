"""Finding the uid behind a local client socket in /proc/net/tcp{,6}."""

from __future__ import annotations

import os
import socket

from metaproxy.kernel.peer_owner import _hex_address, client_uid


def test_proc_net_tcp_spelling() -> None:
    assert _hex_address("127.0.0.1", 8675) == "0100007F:21E3"
    assert _hex_address("::1", 80) == "00000000000000000000000001000000:0050"


def test_finds_the_uid_of_a_real_local_socket() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    try:
        accepted, peer = server.accept()
        with accepted:
            assert client_uid(socket.AF_INET, peer, server.getsockname()) == os.getuid()
            assert client_uid(socket.AF_INET, peer, ("127.0.0.1", 1)) is None
    finally:
        client.close()
        server.close()
