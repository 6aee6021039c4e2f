"""The configobj text format, read in one linear pass. Pure: text in, a tree out.

Why not hand the text to ConfigObj: its line regexes backtrack. A line of
2,000 spaces and an ``x`` took 5 s, ``[`` and 2,000 spaces 14 s, and on
SIGHUP that parse runs inside the event loop. Here every line is split with
``str.strip``, ``str.find`` and one character-class search, each of which
moves forward only, so a file costs time in proportion to its length. ConfigObj
is still used afterwards, on the finished tree, to apply the configspec.

The subset read is what configobj documents and our files use:

* ``# comment`` lines and blank lines; indentation means nothing;
* ``[section]``, ``[[subsection]]`` (the number of brackets is the depth),
  names optionally quoted, with an optional trailing comment;
* ``key = value``, the key optionally quoted; the value is a string, or a
  list when it has a comma outside quotes (``a, b``; ``a,`` is a list of one;
  ``,`` alone is the empty list); items may be quoted; ``#`` outside quotes
  starts a comment; a triple-quoted value must end on its own line.

Each problem is (line number, message). A message never repeats the line's
text: a password may be on it, and ``-t`` runs into the journal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from metaproxy.config.lines import LineIndex

Value = Union[str, list[str]]
Tree = dict[str, Union["Tree", Value]]

# One item of a value and what ends it: a comma, a comment or the end. Every
# quantifier is possessive (*+), so a failed match is never retried with
# fewer characters: each match costs at most the length it looks at.
_ITEM = re.compile(r"""\s*+(?:"([^"]*+)"|'([^']*+)'|([^,#"'\s][^,#]*+))?\s*+(,|\#|\Z)""")
_NON_SPACE = re.compile(r"\S")
# The brackets of a section marker, spaces allowed between them; possessive too.
_BRACKETS = {"[": re.compile(r"(?:\s*+\[)*+"), "]": re.compile(r"(?:\s*+\])*+")}
_QUOTES = "\"'"


class _LineError(ValueError):
    """One line cannot be read; the message says why, without quoting the line."""


@dataclass(slots=True)
class Parsed:
    tree: Tree = field(default_factory=dict)
    lines: LineIndex = field(default_factory=LineIndex)
    problems: list[tuple[int, str]] = field(default_factory=list)


def parse(text: str) -> Parsed:
    """The tree of sections and values, where each is written, and every problem."""
    out = Parsed()
    path: list[str] = []
    sections: list[Tree] = [out.tree]  # sections[d] is the section at depth d
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith("["):
                depth, name = _section_marker(line)
                _open_section(depth, name, path, sections)
                out.lines.add(tuple(path), None, number)
            else:
                key, value = _key_value(line)
                current = sections[-1]
                if key in current:
                    raise _LineError(f"the key {key!r} is written twice in this section")
                current[key] = value
                out.lines.add(tuple(path), key, number)
        except _LineError as e:
            out.problems.append((number, str(e)))
    return out


def _section_marker(line: str) -> tuple[int, str]:
    depth, i = _count(line, 0, "[")
    i = _skip_space(line, i)
    if i < len(line) and line[i] in _QUOTES:
        end = line.find(line[i], i + 1)
        if end < 0:
            raise _LineError("expected a section name in [brackets], found an unterminated quote")
        name, i = line[i + 1:end], end + 1
    else:
        end = line.find("]", i)
        if end < 0:
            raise _LineError("expected a section marker such as [name], found no closing ]")
        name, i = line[i:end].strip(), end
    closing, i = _count(line, i, "]")
    rest = line[i:].lstrip()
    if rest and not rest.startswith("#"):
        raise _LineError("expected only a comment after the section marker, found other text")
    if not name.strip():
        raise _LineError("expected a section name in [brackets], found none")
    if closing != depth:
        raise _LineError(f"expected as many ] as [, found {depth} [ and {closing} ]")
    return depth, name


def _count(line: str, i: int, bracket: str) -> tuple[int, int]:
    """How many ``bracket`` characters (whitespace between them allowed) start at ``i``."""
    run = _BRACKETS[bracket].match(line, i)
    if run is None:  # cannot happen: the pattern matches the empty string
        return 0, i
    return run.group().count(bracket), run.end()


def _open_section(depth: int, name: str, path: list[str], sections: list[Tree]) -> None:
    if depth > len(path) + 1:
        raise _LineError(f"expected a section at most {len(path) + 1} deep here, found one {depth} deep "
                         "(too many brackets)")
    parent = sections[depth - 1]
    if name in parent:
        raise _LineError(f"the section name {name!r} is written twice in its parent")
    child: Tree = {}
    parent[name] = child
    del path[depth - 1:], sections[depth:]
    path.append(name)
    sections.append(child)


def _key_value(line: str) -> tuple[str, Value]:
    if line[0] in _QUOTES:
        end = line.find(line[0], 1)
        if end < 0:
            raise _LineError("expected key = value, found an unterminated quote in the key")
        key, rest = line[1:end], line[end + 1:].lstrip()
        if not rest.startswith("="):
            raise _LineError("expected = after the quoted key")
        return key, _value(rest[1:].strip())
    equals = line.find("=")
    if equals <= 0:
        raise _LineError("expected a section [name] or key = value, found neither")
    return line[:equals].strip(), _value(line[equals + 1:].strip())


def _value(text: str) -> Value:
    for triple in ('"""', "'''"):
        if text.startswith(triple):
            end = text.find(triple, 3)
            if end < 0:
                raise _LineError("expected a triple-quoted value to end on the same line")
            _only_comment(text[end + 3:])
            return text[3:end]
    if text.startswith(","):
        _only_comment(text[1:])
        return []
    items: list[str] = []
    comma, i = False, 0
    while True:
        item = _ITEM.match(text, i)
        if item is None:
            raise _LineError(_why_not_an_item(text, i))
        double, single, bare, after = item.groups()
        if double is not None or single is not None:
            items.append(double if double is not None else single)
        elif bare is not None:
            items.append(bare.rstrip())
        elif after == ",":
            raise _LineError("expected a value between two commas, found none")
        if after != ",":
            break
        comma, i = True, item.end()
    if comma:
        return items
    return items[0] if items else ""


def _why_not_an_item(text: str, i: int) -> str:
    start = _skip_space(text, i)
    if text[start] in _QUOTES and text.find(text[start], start + 1) < 0:
        return "expected a closing quote in the value, found none"
    return "expected a comma or a comment after a quoted value, found other text"


def _skip_space(text: str, i: int) -> int:
    found = _NON_SPACE.search(text, i)
    return len(text) if found is None else found.start()


def _only_comment(rest: str) -> None:
    rest = rest.strip()
    if rest and not rest.startswith("#"):
        raise _LineError("expected only a comment after the value, found other text")
