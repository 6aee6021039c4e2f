"""The uid of the local process that opened a redirected connection.

The kernel lists every TCP socket of our network namespace, with its owner's
uid, in /proc/net/tcp and /proc/net/tcp6. The client's own socket is the one
whose local end is our peer and whose remote end is the original destination.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

_TABLES: dict[int, str] = {socket.AF_INET: "/proc/net/tcp", socket.AF_INET6: "/proc/net/tcp6"}


def _hex_address(ip: str, port: int) -> str:
    """The /proc/net/tcp spelling: 32-bit words in host byte order, then the port."""
    packed = ipaddress.ip_address(ip).packed
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def client_uid(family: int, peer: tuple[str, int], dest: tuple[str, int]) -> int | None:
    """Return the uid, or None if the socket is not (or no longer) listed."""
    local = _hex_address(*peer)
    remote = _hex_address(*dest)
    try:
        with open(_TABLES[family], encoding="ascii") as table:
            next(table, None)
            for line in table:
                fields = line.split()
                if len(fields) > 7 and fields[1] == local and fields[2] == remote:
                    return int(fields[7])
    except OSError:
        return None
    return None
