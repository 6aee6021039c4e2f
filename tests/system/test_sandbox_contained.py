"""What a compromised daemon can still do, in the lab: Landlock, the socket
protocols and W^X, on this machine's kernel.

1. A child in the client namespace runs the daemon's own start-up plan for the lab's
   config (drop to nobody, Landlock with the daemon's paths and upstream ports, the
   kill filter) and then tries each hole: a TCP port that is no upstream's (a Tor
   ControlPort), an abstract Unix socket, a file outside its tree, an MPTCP socket, a
   W+X mapping. The upstream itself stays reachable.
2. The real daemon under all of it logs the Landlock ABI once, relays end to end, and
   refuses a reload that needs a right the sandbox no longer has, with "restart to
   apply", while the running configuration keeps relaying.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from metaproxy.privileged.landlock_rules import kernel_abi
from tests.system import clients, peers
from tests.system.daemon import Daemon, StartDaemon
from tests.system.lab import GATEWAY4, PYTHON, REPO, WEB4, WEB6, clean_env
from tests.system.peers import World
from tests.system.topology import UPSTREAMS

ABI = kernel_abi()
ROUTES = ("dante", "unix_socks", "http_v6")
CONTROL_PORT = 9051  # stands for a Tor ControlPort: on loopback, and no upstream's

CHILD = r"""
import errno, json, mmap, os, socket, sys
from metaproxy import daemon, privileged
from metaproxy.config import load

config_path, hole, gateway, upstream_port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = load(config_path)
control = socket.create_server(("127.0.0.1", %(control)d))  # bound as root, before the sandbox
abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
abstract.bind("\0metaproxy-contained-%%d" %% os.getpid())
abstract.listen()
plan = daemon._Sandbox.of(config, config_path)
privileged.drop_privileges("nobody")
found = privileged.restrict_access(plan.read_paths(), plan.ports)
privileged.load_syscall_filter("kill")

def attempt(fn):
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"

def connect(address):
    with socket.socket() as s:
        s.connect(address)

seen = {"abi": found.abi,
        "upstream": attempt(lambda: connect((gateway, upstream_port))),
        "control port": attempt(lambda: connect(("127.0.0.1", %(control)d))),
        "abstract": attempt(lambda: socket.socket(socket.AF_UNIX).connect(abstract.getsockname())),
        "file outside": attempt(lambda: open("/etc/hostname").read()),
        "config": attempt(lambda: open(config_path).read())}
print(json.dumps(seen), flush=True)
if hole == "mptcp":
    socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
elif hole == "wx":
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
print("survived", flush=True)
""" % {"control": CONTROL_PORT}


def _config(port: int, unix_socket: Path, routes: tuple[str, ...] = ROUTES) -> str:
    lines = ["[daemon]", "listen = 127.0.0.1, ::1", f"port = {port}", "user = nobody",
             "seccomp = kill", "[upstreams]"]
    for name in routes:
        lines.append(f"    [[{name}]]")
        lines += ["    " + line for line in UPSTREAMS[name][1].format(unix_socket=unix_socket).splitlines()]
    lines += ["[routes]"] + [f"{UPSTREAMS[name][0]} = {name}" for name in routes]
    return "\n".join(lines) + "\n"


def _run_child(world: World, hole: str) -> tuple[int, dict[str, object], str]:
    config = world.lab.file("contained.conf", _config(8600, world.gateway.unix_socket))
    proc = world.client.run([PYTHON, "-c", CHILD, str(config), hole, GATEWAY4, str(peers.DANTE_PORT)],
                            check=False, timeout=30, cwd=REPO,
                            env=clean_env(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1"))
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    lines = out.splitlines()
    assert lines and lines[0].startswith("{"), f"the child exited {proc.returncode}:\n{out}\n{err}"
    return proc.returncode, json.loads(lines[0]), out + err


def test_a_contained_child_reaches_its_upstream_and_nothing_else(world: World) -> None:
    """Under the daemon's own plan: the upstream's port connects; a loopback port that is
    no upstream's gets EACCES (ABI >= 4), an abstract Unix socket EPERM (ABI >= 6), a file
    outside the daemon's tree EACCES; the config file still reads (for reload)."""
    code, seen, output = _run_child(world, "none")
    assert code == 0 and "survived" in output, output
    expected = {"abi": min(ABI, 6), "upstream": "ok", "control port": "EACCES" if ABI >= 4 else "ok",
                "abstract": "EPERM" if ABI >= 6 else "ok", "file outside": "EACCES" if ABI >= 1 else "ok",
                "config": "ok"}
    assert seen == expected, (seen, output)
    if ABI < 6:
        pytest.skip(f"Landlock ABI {ABI} here: the TCP and abstract-socket checks above expected "
                    "no restriction; ABI 6 is needed for all of them")


@pytest.mark.parametrize("hole", ["mptcp", "wx"])
def test_a_contained_child_dies_on_mptcp_or_a_writable_executable_mapping(world: World, hole: str) -> None:
    """An MPTCP socket or a W+X mapping ends the contained child with SIGSYS."""
    code, _, output = _run_child(world, hole)
    assert code == -signal.SIGSYS and "survived" not in output, (code, output)


# ---- the real daemon --------------------------------------------------------------------

@pytest.fixture
def contained(world: World, start_own_daemon: StartDaemon) -> Daemon:
    return start_own_daemon("metaproxy-contained", lambda port: _config(port, world.gateway.unix_socket),
                            unprivileged=False)


def _fetch(world: World, daemon: Daemon) -> None:
    for name, web in (("dante", WEB4), ("unix_socks", WEB4), ("http_v6", WEB6)):
        got = clients.curl(world.client, clients.url(web, UPSTREAMS[name][0], "/index.html"))
        assert got.ok and got.body.decode() == peers.INDEX, (
            f"via {name} to {web}: {got.stderr}\ndaemon:\n{daemon.log()[-3000:]}")


def test_the_daemon_logs_its_landlock_abi_once_and_relays_under_everything(world: World,
                                                                            contained: Daemon) -> None:
    """The daemon says once which Landlock ABI it used and what stays unrestricted, then
    relays through SOCKS5 over TCP and a Unix socket and HTTP CONNECT over IPv6."""
    _fetch(world, contained)
    log = contained.log()
    assert log.count("sandbox: ") == 1, log
    assert f"sandbox: Landlock ABI {min(ABI, 6)} (the kernel's: {ABI})" in log, log
    assert "connect to named Unix sockets" in log, log
    assert contained.alive()


def test_a_reload_that_needs_a_new_upstream_port_is_refused_with_restart_to_apply(
        world: World, contained: Daemon) -> None:
    """A new upstream on a port outside the sandbox: one line says restart to apply, and
    the old routes keep relaying."""
    assert contained.process is not None
    routes = ROUTES + ("microsocks",)
    contained.config.write_text(_config(contained.port, world.gateway.unix_socket, routes))
    mark = contained.mark()
    os.kill(contained.process.pid, signal.SIGHUP)
    log = contained.wait_log("restart to apply", since=mark)
    assert f"upstream port {peers.MICROSOCKS_PORT} is outside the sandbox" in log, log
    assert "reloaded routes" not in log, log
    _fetch(world, contained)


def test_a_reload_of_a_replaced_config_file_says_restart_to_apply(world: World, contained: Daemon) -> None:
    """Landlock's rule holds the config file's inode: a file replaced by rename cannot be
    read, and the reload says why and to restart, keeping the running configuration."""
    assert contained.process is not None
    fresh = contained.config.with_suffix(".new")
    fresh.write_text(contained.config.read_text())
    fresh.chmod(0o644)
    os.replace(fresh, contained.config)
    mark = contained.mark()
    os.kill(contained.process.pid, signal.SIGHUP)
    log = contained.wait_log("restart to apply", since=mark)
    assert "replaced (a new inode)" in log and "keeping the running configuration" in log, log
    _fetch(world, contained)
