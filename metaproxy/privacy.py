"""Destinations that scrub themselves unless the user asked to see them.

A ``Destination`` formats as ``[scrubbed]`` in every log line, error message and
repr, unless ``-d`` or ``log_destinations = yes`` turned display on. Code that
formats a destination by accident therefore still leaks nothing.
"""

from __future__ import annotations

SCRUBBED = "[scrubbed]"


class _Display:
    show = False


def show_destinations(on: bool) -> None:
    _Display.show = on


def destinations_shown() -> bool:
    return _Display.show


class Destination:
    __slots__ = ("ip", "port")

    def __init__(self, ip: str, port: int) -> None:
        self.ip = ip
        self.port = port

    def __str__(self) -> str:
        if not _Display.show:
            return SCRUBBED
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Destination) and (self.ip, self.port) == (other.ip, other.port)

    def __hash__(self) -> int:
        return hash((self.ip, self.port))
