"""Preconditions of the root tiers: FAIL when one is unmet, unless METAPROXY_ALLOW_SKIP=1.

CI runs as root with everything installed, so a skip there would hide that
nothing was tested. On a developer machine, METAPROXY_ALLOW_SKIP=1 skips on
purpose, and says why.
"""

from __future__ import annotations

import os
import shutil

import pytest

SYSPATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


def unmet(reason: str | None) -> None:
    """Nothing if ``reason`` is None; else fail with it, or skip with METAPROXY_ALLOW_SKIP=1."""
    if reason is None:
        return
    if os.environ.get("METAPROXY_ALLOW_SKIP") == "1":
        pytest.skip(reason + " [METAPROXY_ALLOW_SKIP=1]")
    pytest.fail(reason + " -- refusing to skip; set METAPROXY_ALLOW_SKIP=1 to skip on purpose", pytrace=False)


def missing_tools(tools: list[str]) -> str | None:
    missing = [t for t in tools if shutil.which(t, path=SYSPATH) is None]
    return f"missing programs: {', '.join(missing)} (see .ci/apt-packages; `make deps`)" if missing else None


def require_root_and_tools(tools: list[str], why_root: str) -> None:
    problems = [p for p in (why_root if os.geteuid() != 0 else None, missing_tools(tools)) if p]
    unmet("; ".join(problems) or None)
