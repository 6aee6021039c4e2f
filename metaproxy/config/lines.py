"""Line numbers for config keys and sections, which configobj itself does not keep.

``metaproxy.config.syntax`` fills the index as it reads the file, in the same
single pass; nothing here runs a regular expression over the text.
"""

from __future__ import annotations


class LineIndex:
    """Maps (section path, key) to the 1-based line where it is written."""

    def __init__(self) -> None:
        self._lines: dict[tuple[tuple[str, ...], str | None], int] = {}

    def add(self, path: tuple[str, ...], key: str | None, number: int) -> None:
        self._lines.setdefault((path, key), number)

    def line(self, path: tuple[str, ...], key: str | None = None) -> int | None:
        """Where ``key`` is written, else where its section starts, else None."""
        found = self._lines.get((path, key))
        if found is None and key is not None:
            found = self._lines.get((path, None))
        return found
