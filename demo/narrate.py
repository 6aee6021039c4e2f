"""How the demos speak: a bold heading, then what happened, indented."""

from __future__ import annotations

import textwrap


def say(title: str, body: str = "") -> None:
    print(f"\n\033[1m== {title}\033[0m")
    if body:
        print(textwrap.indent(body.rstrip(), "   "))
