"""-t against the system (metaproxy.checks), as root: the groups exist, and a forked child that
dropped to the service user and its groups really connects to each unix: socket."""

from __future__ import annotations

import errno
import grp
import os
import socket
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from metaproxy.checks import check_system
from metaproxy.config import load
from tests.unit.forked import require_root

DAEMON_GID = grp.getgrnam("daemon").gr_gid


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory everyone may search (pytest's own is 0700 under root's), so that a child
    that became nobody reaches what the test puts there."""
    path = Path(tempfile.mkdtemp(prefix="metaproxy-unix-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _config(tmp_path: Path, socket_path: Path, groups: str = "") -> tuple[str, object]:
    path = tmp_path / "m.conf"
    path.write_text(f"[daemon]\nuser = nobody\n{'groups = ' + groups if groups else ''}\n"
                    f"[upstreams]\n    [[tor]]\n    type = socks5\n    address = unix:{socket_path}\n"
                    "[routes]\n* = tor\n")
    return str(path), load(str(path))


def _listening(path: Path, mode: int, gid: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen()
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    os.chmod(path.parent, 0o755)
    return s


def test_a_group_writable_socket_is_an_error_with_file_line_until_groups_names_its_group(
        tmp_path: Path) -> None:
    require_root()
    with _listening(tmp_path / "socks", 0o660, DAEMON_GID):
        source, config = _config(tmp_path, tmp_path / "socks")
        found = check_system(config)  # type: ignore[arg-type]
        assert len(found.errors) == 1 and found.errors[0].startswith(
            f"{source}:7: [upstreams][[tor]] address: unix:{tmp_path}/socks: Permission denied for nobody"), found
        assert "group daemon" in found.errors[0] and "groups = daemon" in found.errors[0], found
        _, config = _config(tmp_path, tmp_path / "socks", groups="daemon")
        found = check_system(config)  # type: ignore[arg-type]
    assert not found.errors and not found.warnings, found
    assert found.notes == [f"upstream tor: unix:{tmp_path}/socks accepts connections from nobody with groups daemon"]


def test_a_missing_socket_or_one_nobody_listens_on_is_a_warning(tmp_path: Path) -> None:
    """Tor may start after the daemon (-t is ExecStartPre): no socket yet is a warning."""
    require_root()
    os.chmod(tmp_path, 0o755)
    _, config = _config(tmp_path, tmp_path / "absent")
    found = check_system(config)  # type: ignore[arg-type]
    assert not found.errors and len(found.warnings) == 1, found
    assert ": warning: No such file or directory" in found.warnings[0], found
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale"))
    os.chmod(tmp_path / "stale", 0o666)
    stale.close()
    _, config = _config(tmp_path, tmp_path / "stale")
    found = check_system(config)  # type: ignore[arg-type]
    assert not found.errors and os.strerror(errno.ECONNREFUSED) in found.warnings[0], found
    assert "nothing listens" in found.warnings[0], found


def test_a_group_that_does_not_exist_is_named_with_file_line(tmp_path: Path) -> None:
    source, config = _config(tmp_path, tmp_path / "absent", groups="no-such-metaproxy-group")
    found = check_system(config)  # type: ignore[arg-type]
    assert found.errors == [f"{source}:3: [daemon] groups: expected existing groups, found no group "
                            "'no-such-metaproxy-group' (install what creates it, e.g. tor for debian-tor)"]


def test_a_missing_service_user_leaves_the_sockets_unchecked_with_a_warning(tmp_path: Path) -> None:
    """-t on a machine without the package's user (a developer's) still passes the file."""
    require_root()
    path = tmp_path / "m.conf"
    path.write_text("[daemon]\nuser = no-such-metaproxy-user\n[upstreams]\n    [[tor]]\n    type = socks5\n"
                    f"    address = unix:{tmp_path}/socks\n[routes]\n* = tor\n")
    found = check_system(load(str(path)))
    assert not found.errors and len(found.warnings) == 1, found
    assert found.warnings[0].startswith(f"{path}:2: warning: the unix: sockets were not checked"), found
    assert "no-such-metaproxy-user" in found.warnings[0], found
