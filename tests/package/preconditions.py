"""Root and tools for the package tests: fail when missing, unless METAPROXY_ALLOW_SKIP=1.

CI runs as root with everything installed, so a skip there would hide that
nothing was tested (the same rule as tests/system/conftest.py).
"""

from __future__ import annotations

import os
import shutil

import pytest

SYSPATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


def require_root_and_tools(tools: list[str], why_root: str) -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append(why_root)
    missing = [t for t in tools if shutil.which(t, path=SYSPATH) is None]
    if missing:
        problems.append(f"missing programs: {', '.join(missing)} (see .ci/apt-packages; `make deps`)")
    if not problems:
        return
    if os.environ.get("METAPROXY_ALLOW_SKIP") == "1":
        pytest.skip("; ".join(problems) + " [METAPROXY_ALLOW_SKIP=1]")
    pytest.fail("; ".join(problems) + " -- refusing to skip; set METAPROXY_ALLOW_SKIP=1 to skip on purpose",
                pytrace=False)
