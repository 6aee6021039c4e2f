"""The package builds as a Debian build daemon builds it: as an ordinary user, with its tests.

A buildd runs dpkg-buildpackage without root. The unit tier then runs as that
user: the tests that need root (they bind, drop privileges and load filters in
forked children) must skip, each saying why, and everything else must pass.
Here the tree is copied to a directory that nobody owns and built there as
nobody, with the unit tests on (no nocheck), exactly as debian/rules runs them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.preconditions import require_root_and_tools

ROOT = Path(__file__).resolve().parents[2]
SYSPATH = "/usr/sbin:/usr/bin:/sbin:/bin"
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
IGNORE = shutil.ignore_patterns(".git", "build", ".pybuild", "__pycache__", ".mypy_cache", ".pytest_cache",
                                ".hypothesis", "*.egg-info")


def _precondition() -> None:
    require_root_and_tools(["dpkg-buildpackage", "dh", "pybuild", "setpriv"], "this test needs root, to build as nobody")


def test_an_unprivileged_build_runs_the_unit_tier_and_skips_only_root_tests_with_reasons() -> None:
    _precondition()
    work = Path(tempfile.mkdtemp(prefix="metaproxy-buildd-"))
    try:
        src = work / "subgraph-metaproxy"
        shutil.copytree(ROOT, src, ignore=IGNORE, symlinks=True)
        subprocess.run(["chown", "-R", "nobody:nogroup", str(work)], check=True)
        env = {"PATH": SYSPATH, "HOME": str(work), "LANG": "C.UTF-8", "TMPDIR": str(work),
               "DEB_BUILD_OPTIONS": ""}
        result = subprocess.run([*NOBODY, "dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=env,
                                capture_output=True, text=True, timeout=1200)
        out = result.stdout + result.stderr
        assert result.returncode == 0, f"the unprivileged build failed:\n{out[-6000:]}"
        assert list(work.glob("subgraph-metaproxy_*_amd64.deb")), f"no .deb was built:\n{out[-3000:]}"
        summary = re.findall(r"(\d+) passed(?:, (\d+) skipped)?", out)
        assert summary, f"the unit tier did not run in the build:\n{out[-3000:]}"
        passed = sum(int(p) for p, _ in summary)
        skipped = sum(int(s or 0) for _, s in summary)
        assert passed > 400, f"only {passed} unit tests passed in the build:\n{out[-3000:]}"
        # Root-only tests skip, and every skip says why (debian/rules runs pytest -rs).
        assert skipped > 0, "no test skipped as nobody: the root-only tests must skip, not pass vacuously"
        reasons = re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", out, re.M)
        assert sum(int(n) for n in re.findall(r"^SKIPPED \[(\d+)\]", out, re.M)) == skipped, out[-3000:]
        assert all(("root" in r or "METAPROXY_ALLOW_SKIP" in r) for r in reasons), "\n".join(reasons)
        assert " failed" not in out and " error" not in out.lower().split("passed")[-1], out[-3000:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
