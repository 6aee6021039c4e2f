"""Line numbers for configobj keys, which configobj itself does not keep."""

from __future__ import annotations

import re

_SECTION = re.compile(r"^\s*(\[+)\s*(.*?)\s*\]+\s*(#.*)?$")
_KEY = re.compile(r"""^\s*(?:"([^"]*)"|'([^']*)'|([^=#]+?))\s*=""")


class LineIndex:
    """Maps (section path, key) to the 1-based line where it is written."""

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[tuple[str, ...], str | None], int] = {}
        path: list[str] = []
        for number, line in enumerate(text.splitlines(), start=1):
            section = _SECTION.match(line)
            if section:
                depth = len(section.group(1))
                path = path[: depth - 1] + [section.group(2).strip("\"'")]
                self._lines.setdefault((tuple(path), None), number)
                continue
            key = _KEY.match(line)
            if key:
                name = next(g for g in key.groups() if g is not None).strip()
                self._lines.setdefault((tuple(path), name), number)

    def line(self, path: tuple[str, ...], key: str | None = None) -> int | None:
        found = self._lines.get((path, key))
        if found is None and key is not None:
            found = self._lines.get((path, None))
        return found
