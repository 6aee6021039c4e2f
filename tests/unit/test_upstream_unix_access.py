"""Why a unix: upstream is unreachable (metaproxy.upstream.unix_access): each errno its own
words, and for EACCES the socket's owner, group and mode, or the directory that says no,
with the remedy ([daemon] groups)."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from metaproxy.upstream import unix_access
from tests.unit.forked import in_child, require_root

DAEMON_GID = grp.getgrnam("daemon").gr_gid
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory everyone may search (pytest's own is 0700 under root's), so that a child
    that became nobody reaches what the test puts there. Every test here chowns sockets to
    root and connects as nobody: root only (a buildd skips them, saying so)."""
    require_root()
    path = Path(tempfile.mkdtemp(prefix="metaproxy-unix-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _names(kind: str, number: int) -> str | None:
    return {("user", 0): "root", ("group", DAEMON_GID): "daemon"}.get((kind, number))


def _socket(path: Path, mode: int, gid: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen()
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    return s


def test_no_socket_and_nothing_listening_ask_about_the_proxy_but_permissions_do_not(tmp_path: Path) -> None:
    """ENOENT and ECONNREFUSED mean the proxy is not there; EACCES never asks whether it runs."""
    assert "is the proxy (tor) running" in unix_access.explain(errno.ENOENT, str(tmp_path / "x"))
    assert "nothing listens" in unix_access.explain(errno.ECONNREFUSED, str(tmp_path / "x"))
    with _socket(tmp_path / "socks", 0o660, DAEMON_GID):
        text = unix_access.explain(errno.EACCES, str(tmp_path / "socks"), _names)
    assert "running" not in text, text


def test_a_group_writable_socket_names_owner_group_mode_and_groups_remedy(tmp_path: Path) -> None:
    with _socket(tmp_path / "socks", 0o660, DAEMON_GID):
        text = unix_access.explain(errno.EACCES, str(tmp_path / "socks"), _names)
    assert f"owned by root (uid 0), group daemon (gid {DAEMON_GID}), mode srw-rw---- (0660)" in text, text
    assert "[daemon] groups = daemon" in text, text


def test_an_owner_only_socket_says_groupwritable_and_unknown_names_are_numbers(tmp_path: Path) -> None:
    with _socket(tmp_path / "socks", 0o600, 4242):
        text = unix_access.explain(errno.EACCES, str(tmp_path / "socks"), lambda kind, number: None)
    assert "owned by uid 0, group gid 4242, mode srw------- (0600)" in text, text
    assert "GroupWritable" in text and "<the name of gid 4242>" in text, text


def test_a_directory_the_user_cannot_search_is_the_one_named(tmp_path: Path) -> None:
    """As nobody, /…/tor (02700, group daemon) hides its socket: the message names that
    directory, with its owner, group and mode, not the socket."""
    tor = tmp_path / "tor"
    tor.mkdir()
    os.chown(tor, 0, DAEMON_GID)
    os.chmod(tor, 0o2700)
    os.chmod(tmp_path, 0o755)
    sock = _socket(tor / "socket", 0o660, DAEMON_GID)

    def body() -> list[object]:
        os.setgroups([])
        os.setresgid(NOBODY.pw_gid, NOBODY.pw_gid, NOBODY.pw_gid)
        os.setresuid(NOBODY.pw_uid, NOBODY.pw_uid, NOBODY.pw_uid)
        with socket.socket(socket.AF_UNIX) as s:
            err = s.connect_ex(str(tor / "socket"))
        return [err, unix_access.explain(err, str(tor / "socket"), _names)]
    try:
        outcome = in_child(body)
    finally:
        sock.close()
    assert outcome.ok, outcome
    err, text = outcome.value
    assert err == errno.EACCES, outcome
    assert f"may not search the directory {tor} (owned by root (uid 0), group daemon" in text, text
    assert "drwx--S--- (2700)" in text and "groups = daemon" in text, text


def test_learn_names_remembers_the_groups_and_the_owners_on_the_path(tmp_path: Path) -> None:
    with _socket(tmp_path / "socks", 0o660, DAEMON_GID):
        unix_access.learn_names([str(tmp_path / "socks")], ["daemon", "no-such-group-here"])
    assert unix_access.learned("group", DAEMON_GID) == "daemon"
    assert unix_access.learned("user", 0) == "root"
