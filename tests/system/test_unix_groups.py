"""[daemon] groups: the real daemon, dropped to nobody, reaches a GroupWritable
unix: SOCKS socket only when it keeps that socket's group.

The socket is a socat front for the lab's unix: SOCKS upstream, mode 0660, owner root,
group daemon, in a directory everyone may search: what a GroupWritable Tor SocksPort
looks like. Without ``groups = daemon`` the connection is refused and the log names the
socket's owner, group and mode and the remedy, never "is the proxy running?"; -t (as
root) says the same with file:line and exits 78. With it, the page arrives.
"""

from __future__ import annotations

import grp
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.system import clients, peers
from tests.system.daemon import StartDaemon, check_config, daemon_section
from tests.system.lab import WEB4
from tests.system.peers import World

PORT = 8003  # a web port the lab serves; routed to the group-only socket here
DAEMON_GID = grp.getgrnam("daemon").gr_gid


@pytest.fixture
def group_socket(world: World) -> Iterator[Path]:
    directory = world.lab.tmp / "group-socks"
    directory.mkdir(exist_ok=True)
    directory.chmod(0o755)
    path = directory / "socks"
    front = world.lab.client.spawn("socat-group-socks", [
        "socat", f"UNIX-LISTEN:{path},fork,unlink-early,user=root,group={DAEMON_GID},mode=660",
        f"UNIX-CONNECT:{world.gateway.unix_socket}"])
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"socat did not create {path}"
    try:
        yield path
    finally:
        front.stop()


def _config(path: Path, groups: str) -> Callable[[int], str]:
    def text(port: int) -> str:
        return (daemon_section(port) + (f"groups = {groups}\n" if groups else "") +
                f"[upstreams]\n    [[grouponly]]\n    type = socks5\n    address = unix:{path}\n"
                f"[routes]\n{PORT} = grouponly\n")
    return text


def test_without_groups_the_socket_is_refused_and_the_log_says_why(
        world: World, group_socket: Path, start_own_daemon: StartDaemon) -> None:
    daemon = start_own_daemon("metaproxy-nogroups", _config(group_socket, ""), unprivileged=False)
    got = clients.curl(world.client, clients.url(WEB4, PORT, "/index.html"), timeout=10)
    assert not got.ok, got
    log = daemon.wait_log("is unreachable", timeout=5)
    assert "Permission denied" in log and "is the proxy running" not in log, log
    assert f"owned by root (uid 0), group daemon (gid {DAEMON_GID}), mode srw-rw---- (0660)" in log, log
    assert "[daemon] groups = daemon" in log, log


def test_with_groups_the_daemon_reaches_the_socket(
        world: World, group_socket: Path, start_own_daemon: StartDaemon) -> None:
    daemon = start_own_daemon("metaproxy-groups", _config(group_socket, "daemon"), unprivileged=False)
    got = clients.curl(world.client, clients.url(WEB4, PORT, "/index.html"), timeout=10)
    assert got.ok, f"{got.stderr}\n{daemon.log()[-2000:]}"
    assert got.body.decode() == peers.INDEX
    status = Path(f"/proc/{daemon.process.pid}/status").read_text() if daemon.process else ""
    assert f"Groups:\t{DAEMON_GID} " in status or f"Groups:\t{DAEMON_GID}\n" in status, status


def test_config_check_connects_as_the_service_user_and_names_file_and_line(
        world: World, group_socket: Path) -> None:
    text = _config(group_socket, "")(8675)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if t.strip().startswith("address"))
    without = world.lab.file("groups-check-without.conf", text)
    code, out, err = check_config(without)
    assert code == 78, (code, out, err)
    assert f"{without}:{line}: [upstreams][[grouponly]] address: unix:{group_socket}: Permission denied for nobody" \
        in err, err
    assert "groups = daemon" in err, err
    with_groups = world.lab.file("groups-check-with.conf", _config(group_socket, "daemon")(8675))
    code, out, err = check_config(with_groups)
    assert code == 0, (code, out, err)
    assert "user nobody, groups daemon" in out, out
    assert f"unix:{group_socket} accepts connections from nobody with groups daemon" in out, out
