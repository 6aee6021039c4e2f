"""A minimal Debian 12 root file system, debootstrapped once and reused.

The cache (default /var/cache/metaproxy-test/bookworm) holds the runtime
dependencies of the package already installed, because the container that
boots it has no network: apt inside it can only install the local .deb.

1. The cache is valid when its stamp file matches RECIPE. A different recipe
   (a package added to INCLUDE) rebuilds it.
2. debootstrap writes into a sibling directory that is renamed into place only
   when it has finished, so an interrupted run never leaves a half-made cache.
3. A lock file serialises builders; users hold it shared, so the cache is not
   replaced under a running container.
4. Each run boots an overlay of the cache (upper layer in a temporary
   directory), so the cache itself is never changed by a test.
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
DEFAULT_CACHE = Path(os.environ.get("METAPROXY_TEST_ROOTFS", "/var/cache/metaproxy-test/bookworm"))
SUITE = "bookworm"
DEBOOTSTRAP_TIMEOUT = 1500  # seconds; about one minute from a nearby mirror

# The package's Depends, and what the test drives inside the container.
RUNTIME = ["python3", "python3-async-timeout", "python3-configobj", "python3-prctl",
           "python3-python-socks", "python3-seccomp", "python3-systemd", "procps"]
INCLUDE = RUNTIME + [
    "systemd", "systemd-sysv", "dbus",      # a real PID 1 and systemctl
    "man-db",                               # systemd-analyze verify checks Documentation=man:
    "iproute2", "iptables", "nftables",     # addresses on lo; the REDIRECT rules
    "curl", "microsocks",                   # the client, and the SOCKS5 upstream
]
RECIPE = {"suite": SUITE, "variant": "minbase", "include": sorted(INCLUDE), "version": 1}
STAMP = ".metaproxy-test-stamp"


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


def _stamp_ok(root: Path) -> bool:
    try:
        return json.loads((root / STAMP).read_text()) == RECIPE
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


def _debootstrap(target: Path, mirror: str, log: Path) -> None:
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    argv = ["debootstrap", "--variant=minbase", "--include=" + ",".join(INCLUDE)]
    if keyring.is_file():
        argv.append(f"--keyring={keyring}")
    argv += [SUITE, str(target), mirror]
    with open(log, "w") as out:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=DEBOOTSTRAP_TIMEOUT,
                                env={"PATH": SYSPATH, "LANG": "C.UTF-8", "HOME": "/root"})
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"debootstrap {SUITE} from {mirror} failed ({result.returncode}); "
                           f"its log {log} ends:\n{tail}")


def ensure_cache(cache: Path = DEFAULT_CACHE) -> Path:
    """Return the cached root, debootstrapping it first if missing or stale."""
    lock = cache.with_name(cache.name + ".lock")
    with _locked(lock, fcntl.LOCK_EX):
        if _stamp_ok(cache):
            return cache
        mirror = apt_mirror()
        fresh = cache.with_name(cache.name + ".new")
        shutil.rmtree(fresh, ignore_errors=True)
        _debootstrap(fresh, mirror, cache.with_name(cache.name + ".debootstrap.log"))
        # No stale apt state or machine id in the image that every run shares.
        (fresh / "etc/machine-id").write_text("")
        (fresh / STAMP).write_text(json.dumps(RECIPE))
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
