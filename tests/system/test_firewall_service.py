"""metaproxy-firewall.service under a real systemd (root, systemd-nspawn).

A booted Debian 12 container (an overlay of the package test's cached root,
tests/package/rootfs.py) gets this source tree's ``metaproxy`` package, the
Debian launcher as /usr/sbin/subgraph_metaproxy, a config, and the unit from
debian/, enabled as the package's users would enable it. Then:

- at boot the unit is active with table inet metaproxy loaded, and systemd
  reports no ordering cycle (the unit runs before network-pre.target);
- reload replaces the table with the rules of the edited config;
- stop removes the table, and stops cleanly even if it was already gone;
- a broken config makes start fail and loads nothing, instead of
  "succeeding" with an empty ruleset.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Iterator

import pytest

from tests.package.container import Container
from tests.package.rootfs import ensure_cache, scratch_root
from tests.preconditions import unmet

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "debian" / "subgraph-metaproxy.metaproxy-firewall.service"
LAUNCHER = REPO / "debian" / "bin" / "subgraph_metaproxy"
NAME = "metaproxy-firewall.service"
SYSPATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"

CONFIG = """\
[daemon]
user = nobody
port = {port}
[upstreams]
    [[lan]]
    type = socks5
    address = 192.0.2.2:1080
[routes]
* = lan
[firewall]
dns = 127.0.0.1:5353
"""


def _precondition() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "the unit test needs root (systemd-nspawn)"
    elif missing := [t for t in ("systemd-nspawn", "nsenter", "debootstrap") if shutil.which(t, path=SYSPATH) is None]:
        reason = f"missing programs: {', '.join(missing)}"
    elif not UNIT.exists() or not LAUNCHER.exists():
        reason = f"{UNIT} or {LAUNCHER} is missing"
    unmet(reason)


def install(root: Path) -> None:
    """What the package would install, from this source tree; the unit enabled."""
    site = root / "usr/lib/python3/dist-packages/metaproxy"
    shutil.copytree(REPO / "metaproxy", site, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    launcher = root / "usr/sbin/subgraph_metaproxy"
    shutil.copy(LAUNCHER, launcher)
    launcher.chmod(0o755 | stat.S_IFREG)
    (root / "etc/subgraph_metaproxy.conf").write_text(CONFIG.format(port=8675))
    units = root / "etc/systemd/system"
    shutil.copy(UNIT, units / NAME)
    wants = units / "sysinit.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / NAME).symlink_to(f"/etc/systemd/system/{NAME}")


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    _precondition()
    with scratch_root(ensure_cache()) as root:
        install(root)
        box = Container(root, tmp_path_factory.mktemp("nspawn") / "console.log", name=f"mpfw{os.getpid()}")
        try:
            box.boot()
            yield box
        finally:
            box.stop()


def tables(box: Container) -> str:
    return box.run(["nft", "list", "tables"]).stdout


def test_enabled_unit_loads_the_rules_at_boot_without_ordering_cycles(container: Container) -> None:
    container.run(["systemctl", "is-active", "--wait", NAME], check=False, timeout=30)
    state = container.run(["systemctl", "show", "-p", "ActiveState,Result", NAME]).stdout
    assert "ActiveState=active" in state, state + container.run(["journalctl", "-b", "-u", NAME], check=False).stdout
    ruleset = container.run(["nft", "list", "table", "inet", "metaproxy"]).stdout
    assert "redirect to :8675" in ruleset and "reject with tcp reset" in ruleset, "the unit loads --strict"
    journal = container.run(["journalctl", "-b", "--no-pager"], check=False).stdout
    assert "ordering cycle" not in journal.lower()
    order = container.run(["systemctl", "show", "-p", "Before", NAME]).stdout
    assert "network-pre.target" in order and "metaproxy.service" in order


def test_reload_replaces_the_table_with_the_edited_config(container: Container) -> None:
    container.write("/etc/subgraph_metaproxy.conf", CONFIG.format(port=9040))
    try:
        container.run(["systemctl", "reload", NAME])
        ruleset = container.run(["nft", "list", "table", "inet", "metaproxy"]).stdout
        assert "redirect to :9040" in ruleset and ":8675" not in ruleset
        assert tables(container).count("table inet metaproxy") == 1
    finally:
        container.write("/etc/subgraph_metaproxy.conf", CONFIG.format(port=8675))


def test_stop_removes_the_table_even_if_it_is_already_gone(container: Container) -> None:
    container.run(["systemctl", "restart", NAME])
    assert "table inet metaproxy" in tables(container)
    container.run(["systemctl", "stop", NAME])
    assert "table inet metaproxy" not in tables(container)
    container.run(["systemctl", "start", NAME])
    container.run(["nft", "delete", "table", "inet", "metaproxy"])
    container.run(["systemctl", "stop", NAME])
    state = container.run(["systemctl", "show", "-p", "ActiveState,Result", NAME]).stdout
    assert "ActiveState=inactive" in state and "Result=success" in state, state


def test_a_broken_config_fails_the_unit_and_loads_nothing(container: Container) -> None:
    container.run(["systemctl", "stop", NAME])
    container.write("/etc/subgraph_metaproxy.conf", "[daemon]\nport = seventy\n")
    try:
        started = container.run(["systemctl", "start", NAME], check=False)
        assert started.returncode != 0, "start must fail on a broken config"
        assert "table inet metaproxy" not in tables(container)
        log = container.run(["journalctl", "-b", "-u", NAME, "--no-pager"], check=False).stdout
        assert "port" in log, "the config error is logged:\n" + log
    finally:
        container.write("/etc/subgraph_metaproxy.conf", CONFIG.format(port=8675))
        container.run(["systemctl", "reset-failed", NAME], check=False)
