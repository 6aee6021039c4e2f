"""What the running daemon looks like from outside (the contract in docs/CONTRACTS.md)."""

from __future__ import annotations

from pathlib import Path

from tests.system.daemon import NOBODY, SECCOMP, Daemon, metaproxy_argv
from tests.system.lab import REPO, clean_env, run
from tests.system.peers import World


def _status(daemon: Daemon) -> dict[str, str]:
    assert daemon.process is not None
    text = Path(f"/proc/{daemon.process.pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def test_serving_daemon_is_the_service_user_without_privileges(relay: Daemon) -> None:
    """Once serving, the daemon (started as root) runs as user nobody from the config: every
    uid and gid is 65534, no supplementary groups, no effective or permitted capabilities,
    and no-new-privs is set; with the filter on, seccomp is in filter mode."""
    status = _status(relay)
    assert status["Uid"].split() == ["65534"] * 4, status["Uid"]
    assert status["Gid"].split() == ["65534"] * 4, status["Gid"]
    assert status["Groups"] in ("", "65534"), status["Groups"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    assert status["NoNewPrivs"] == "1", status
    if SECCOMP != "off":
        assert status["Seccomp"] == "2", f"seccomp mode {status['Seccomp']} (2 is filter)"


def test_no_root_process_stays_behind(relay: Daemon) -> None:
    """The daemon is one process: no child or thread keeps root."""
    assert relay.process is not None
    tasks = Path(f"/proc/{relay.process.pid}/task")
    for task in tasks.iterdir():
        uids = [line for line in (task / "status").read_text().splitlines() if line.startswith("Uid:")]
        assert uids and uids[0].split()[1:] == ["65534"] * 4, f"task {task.name}: {uids}"
    children = Path(f"/proc/{relay.process.pid}/task/{relay.process.pid}/children").read_text().split()
    assert children == [], f"unexpected child processes {children}"


def test_non_root_start_without_unprivileged_is_refused(world: World) -> None:
    """Started by another user without --unprivileged, the daemon says why, names the
    way out, and exits 77 (EX_NOPERM) without serving."""
    config = world.lab.file("non-root.conf", "[daemon]\nlisten = 127.0.0.1\nport = 8799\n[upstreams]\n"
                            "[[t]]\ntype = socks5\naddress = 127.0.0.1:9\n[routes]\n* = t\n")
    proc = run(NOBODY + metaproxy_argv(["-c", str(config), "--log-target", "stderr"]), check=False,
               cwd=REPO, env=clean_env(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1"))
    err = proc.stderr.decode()
    assert proc.returncode == 77, (proc.returncode, err)
    assert "must start as root" in err and "--unprivileged" in err, err
    assert "listening" not in err
