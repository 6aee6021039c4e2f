"""Minimal Debian root file systems (12 and 13), debootstrapped once and reused.

Each suite has its cache (default /var/cache/metaproxy-test/<suite>; the
directory is METAPROXY_TEST_ROOTFS). It holds the runtime dependencies of the
package already installed, because the container that boots it has no
network: apt inside it can only install the local .deb.

1. The cache is valid when its stamp file matches the suite's recipe. A
   different recipe (a package added to its include list) rebuilds it.
2. debootstrap writes into a sibling directory that is renamed into place only
   when it has finished, so an interrupted run never leaves a half-made cache.
3. A lock file serialises builders; users hold it shared, so the cache is not
   replaced under a running container.
4. Each run boots an overlay of the cache (upper layer in a temporary
   directory), so the cache itself is never changed by a test.
5. Every suite comes from the one Debian mirror this machine's apt uses for
   bookworm (METAPROXY_TEST_MIRROR overrides it): a trixie root needs no
   trixie line in /etc/apt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

SYSPATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
CACHE_DIR = Path(os.environ.get("METAPROXY_TEST_ROOTFS", "/var/cache/metaproxy-test"))
SUITE = "bookworm"  # the default suite, and the one whose apt source names the mirror
SUITES = ("bookworm", "trixie")
DEFAULT_CACHE = CACHE_DIR / SUITE
DEBOOTSTRAP_TIMEOUT = 1500  # seconds; one to three minutes from a nearby mirror

# The package's Depends (debian/control), and what the test drives inside the container.
RUNTIME = ["python3", "python3-configobj", "python3-prctl", "python3-seccomp", "python3-systemd", "procps"]
BOOT = [
    "systemd", "systemd-sysv", "dbus",      # a real PID 1 and systemctl
    "man-db",                               # systemd-analyze verify checks Documentation=man:
    "iproute2", "iptables", "nftables",     # addresses on lo; the REDIRECT rules
    "curl", "microsocks",                   # the client, and the SOCKS5 upstream
    "tor",                                  # Debian's tor, its /run/tor/socks reached by the service
]
# The unit tier and mypy under trixie's python3 (tests/system/test_trixie_unit_tier.py):
# the Build-Depends <!nocheck> of debian/control, and mypy. Only the trixie root
# has them, so only the bookworm root proves that the package's Depends suffice.
UNIT_TIER = ["python3-pytest", "python3-hypothesis", "python3-python-socks", "mypy"]
INCLUDE: dict[str, list[str]] = {
    "bookworm": RUNTIME + BOOT,
    "trixie": RUNTIME + BOOT + UNIT_TIER,
}
STAMP = ".metaproxy-test-stamp"


def recipe(suite: str) -> dict[str, object]:
    """What a suite's cache was made from; a change rebuilds the cache."""
    return {"suite": suite, "variant": "minbase", "include": sorted(INCLUDE[suite]), "version": 2}


def cache_path(suite: str = SUITE) -> Path:
    if suite not in INCLUDE:
        raise ValueError(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)}")
    return CACHE_DIR / suite


def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses (the one that serves bookworm main).

    METAPROXY_TEST_MIRROR overrides it. Both one-line (sources.list) and
    deb822 (*.sources) entries are read.
    """
    override = os.environ.get("METAPROXY_TEST_MIRROR")
    if override:
        return override
    entries: list[tuple[list[str], list[str], list[str]]] = []  # (uris, suites, components)
    files = [sources / "sources.list"] + sorted((sources / "sources.list.d").glob("*.list"))
    for path in files:
        if not path.is_file():
            continue
        for text in path.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", text.split("#", 1)[0]).split()  # drop [options]
            if len(words) >= 4 and words[0] == "deb":
                entries.append(([words[1]], [words[2]], words[3:]))
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                entries.append((fields.get("uris", "").split(), fields.get("suites", "").split(),
                                fields.get("components", "").split()))
    for uris, suites, components in entries:
        if SUITE in suites and "main" in components:
            for uri in uris:
                if uri.startswith(("http://", "https://", "file:/")):
                    return uri
    raise RuntimeError(f"no apt source in {sources} serves Debian {SUITE} main; set METAPROXY_TEST_MIRROR")


def _stamp_ok(root: Path, suite: str) -> bool:
    try:
        return bool(json.loads((root / STAMP).read_text()) == recipe(suite))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(lock: Path, mode: int) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _debootstrap(suite: str, target: Path, mirror: str, log: Path) -> None:
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    argv = ["debootstrap", "--variant=minbase", "--include=" + ",".join(INCLUDE[suite])]
    if keyring.is_file():
        argv.append(f"--keyring={keyring}")
    argv += [suite, str(target), mirror]
    with open(log, "w") as out:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=DEBOOTSTRAP_TIMEOUT,
                                env={"PATH": SYSPATH, "LANG": "C.UTF-8", "HOME": "/root"})
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"debootstrap {suite} from {mirror} failed ({result.returncode}); "
                           f"its log {log} ends:\n{tail}")


def _disable_tor(root: Path) -> None:
    """tor's postinst enabled it: a test starts it when it wants it, so that the
    other steps (and the boot) stay as they were without it."""
    result = subprocess.run(["systemctl", f"--root={root}", "disable", "tor.service", "tor@default.service"],
                            capture_output=True, text=True, timeout=60, env={"PATH": SYSPATH})
    if result.returncode != 0:
        raise RuntimeError(f"systemctl --root={root} disable tor failed:\n{result.stdout}{result.stderr}")


def ensure_cache(suite: str = SUITE) -> Path:
    """Return the suite's cached root, debootstrapping it first if missing or stale."""
    cache = cache_path(suite)
    lock = cache.with_name(cache.name + ".lock")
    with _locked(lock, fcntl.LOCK_EX):
        if _stamp_ok(cache, suite):
            return cache
        mirror = apt_mirror()
        fresh = cache.with_name(cache.name + ".new")
        shutil.rmtree(fresh, ignore_errors=True)
        _debootstrap(suite, fresh, mirror, cache.with_name(cache.name + ".debootstrap.log"))
        # No stale apt state or machine id in the image that every run shares.
        (fresh / "etc/machine-id").write_text("")
        _disable_tor(fresh)
        (fresh / STAMP).write_text(json.dumps(recipe(suite)))
        if cache.exists():
            shutil.rmtree(cache)
        fresh.rename(cache)
        return cache


@contextlib.contextmanager
def scratch_root(cache: Path) -> Iterator[Path]:
    """A writable root for one run: an overlay of the cache, removed afterwards."""
    lock = cache.with_name(cache.name + ".lock")
    with _locked(lock, fcntl.LOCK_SH):
        work = Path(tempfile.mkdtemp(prefix="metaproxy-nspawn."))
        upper, scratch, merged = work / "upper", work / "work", work / "root"
        for d in (upper, scratch, merged):
            d.mkdir()
        mounted = False
        try:
            result = subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={cache},upperdir={upper},workdir={scratch}", str(merged)],
                capture_output=True, text=True, timeout=30, env={"PATH": SYSPATH})
            if result.returncode == 0:
                mounted = True
            else:  # no overlayfs here: a full copy works too, only slower
                subprocess.run(["cp", "-a", "--reflink=auto", f"{cache}/.", str(merged)],
                               check=True, timeout=600, env={"PATH": SYSPATH})
            yield merged
        finally:
            if mounted:
                for _ in range(10):
                    if subprocess.run(["umount", str(merged)], capture_output=True, timeout=30,
                                      env={"PATH": SYSPATH}).returncode == 0:
                        break
                    time.sleep(0.5)
                else:
                    subprocess.run(["umount", "--lazy", str(merged)], capture_output=True, timeout=30,
                                   env={"PATH": SYSPATH})
            shutil.rmtree(work, ignore_errors=True)
