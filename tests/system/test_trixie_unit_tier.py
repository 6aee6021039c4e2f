"""The unit tier and mypy under Debian 13's interpreter, so that drift shows in CI.

make check runs the unit tier and mypy with this machine's Debian 12 python3
(3.11) and mypy (1.0). Here the same tree, bind-mounted read-only, runs under
trixie's python3 (3.13) and mypy (1.15) inside the cached trixie root of the
package test (tests/package/rootfs.py), which carries the unit tier's
Build-Depends. The root is an overlay, so nothing in the cache changes; the
command runs under systemd-nspawn with a private network (only its own
loopback) and is killed by PID if it overruns.

Not root, or systemd-nspawn or debootstrap missing: FAIL, unless
METAPROXY_ALLOW_SKIP=1. A root that cannot be made fails too.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.package import rootfs
from tests.package.container import ContainerError, run_once
from tests.preconditions import require_root_and_tools

ROOT = Path(__file__).resolve().parents[2]
SUITE = "trixie"
SRC = "/srv/src"  # the tree, read-only, inside the root
TOOLS = ["systemd-nspawn", "debootstrap", "mount"]
# Neither the tree nor the cache is written: no bytecode, no pytest or mypy cache in the tree.
ENV = ["PYTHONDONTWRITEBYTECODE=1", "MYPY_CACHE_DIR=/tmp/mypy-cache", "HOME=/root"]


def _precondition() -> None:
    require_root_and_tools(TOOLS, "the trixie unit tier needs root (debootstrap, mount, systemd-nspawn)")


@pytest.fixture(scope="module")
def trixie() -> Iterator[Path]:
    """A scratch overlay of the cached trixie root, removed afterwards."""
    _precondition()
    started = time.monotonic()
    try:
        cache = rootfs.ensure_cache(SUITE)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"cannot make the {SUITE} root: {e}", pytrace=False)
    print(f"{SUITE} root ready in {time.monotonic() - started:.1f}s ({cache})")
    with rootfs.scratch_root(cache) as root:
        (root / SRC.lstrip("/")).mkdir(parents=True, exist_ok=True)
        yield root


def inside(root: Path, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    try:
        result = run_once(root, argv, cwd=SRC, env=ENV, binds_ro=[(ROOT, SRC)], timeout=timeout)
    except ContainerError as e:
        pytest.fail(str(e), pytrace=False)
    print(f"{' '.join(argv[:4])} ... took {time.monotonic() - started:.1f}s under {SUITE}")
    return result


def test_interpreters_are_trixies(trixie: Path) -> None:
    """The root runs Python 3.13 and mypy 1.15 (Debian 13), not this machine's 3.11 and 1.0."""
    result = inside(trixie, ["sh", "-c", "python3 -c 'import sys; print(sys.version_info[:2])'; mypy --version"], 120)
    assert result.returncode == 0, result.stdout
    assert "(3, 13)" in result.stdout and "mypy 1.15" in result.stdout, result.stdout


def test_unit_tier_passes_under_python_3_13(trixie: Path) -> None:
    """tests/unit passes under trixie's python3, python-socks, seccomp, prctl and systemd modules."""
    result = inside(trixie, ["python3", "-m", "pytest", "-p", "no:cacheprovider", "-q", "--color=no", "tests/unit"], 1500)
    assert result.returncode == 0, f"the unit tier under {SUITE}'s python3 ({result.returncode}):\n" \
                                   f"{result.stdout[-8000:]}"


def test_mypy_is_clean_under_mypy_1_15(trixie: Path) -> None:
    """mypy --config-file pyproject.toml metaproxy finds nothing with trixie's mypy and stubs."""
    result = inside(trixie, ["mypy", "--config-file", "pyproject.toml", "metaproxy"], 900)
    assert result.returncode == 0, f"mypy under {SUITE} ({result.returncode}):\n{result.stdout[-8000:]}"
