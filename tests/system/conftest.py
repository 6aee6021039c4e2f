"""Fixtures of the root system tier: the lab, its peers and the daemon.

A missing precondition (not root, a peer binary missing) FAILS the tier with
a clear message: CI runs as root with everything installed, so a skip there
would hide that nothing was tested. Set METAPROXY_ALLOW_SKIP=1 to skip instead
on a developer machine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.system import peers
from tests.system.daemon import Daemon, StartDaemon, next_port, start_daemon
from tests.system.lab import SYSPATH, Lab
from tests.system.peers import World
from tests.system.topology import BANNER_PORTS, HTTP_PORTS, WEB_PORTS, shared_config
from tests.preconditions import unmet

REQUIRED = ["ip", "iptables", "ip6tables", "danted", "microsocks", "tinyproxy", "nginx", "socat",
            "squid", "curl", "wget", "setpriv", "unshare", "sysctl"]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the system tests need root (network namespaces, iptables)"
    missing = [b for b in REQUIRED if shutil.which(b, path=SYSPATH) is None]
    if missing:
        return f"missing programs: {', '.join(missing)} (see .ci/apt-packages; `make deps` installs them)"
    if not Path("/usr/bin/python3").exists():
        return "Debian's /usr/bin/python3 is missing"
    return None


def _precondition() -> None:
    unmet(_missing())


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    """The three namespaces with every peer running; torn down whatever happens."""
    _precondition()
    lab = Lab()
    try:
        lab.build()
        gateway = peers.start_gateway(lab, WEB_PORTS)
        web = peers.start_web(lab, HTTP_PORTS, BANNER_PORTS)
        yield World(lab, gateway, web)
    finally:
        lab.close()


@pytest.fixture(scope="session")
def _shared_daemon(world: World) -> Iterator[Daemon]:
    port = next_port()
    daemon = start_daemon(world.lab, "metaproxy-shared", shared_config(port, world.gateway.unix_socket),
                          port=port, redirect=False)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def relay(world: World, _shared_daemon: Daemon) -> Daemon:
    """The shared daemon (every upstream routed by port), with REDIRECT pointing at it."""
    if not _shared_daemon.alive():
        pytest.fail(f"the shared daemon died:\n{_shared_daemon.log()[-4000:]}", pytrace=False)
    world.lab.redirect_to(_shared_daemon.port)
    return _shared_daemon


@pytest.fixture
def start_own_daemon(world: World) -> Iterator[StartDaemon]:
    """Start a daemon of the test's own: ``start(name, config_for_port, args=(), ...)``.

    ``config_for_port(port)`` returns the config text for the port picked;
    "{port}" in args is replaced by it too.
    The REDIRECT rules then point at it; it is stopped after the test.
    """
    started: list[Daemon] = []

    def start(name: str, config_for_port: Callable[[int], str], args: tuple[str, ...] = (),
              suffix: str = ".conf", unprivileged: bool | None = None) -> Daemon:
        port = next_port()
        kwargs = {} if unprivileged is None else {"unprivileged": unprivileged}
        args = tuple(a.replace("{port}", str(port)) for a in args)
        daemon = start_daemon(world.lab, f"{name}-{port}", config_for_port(port), port=port,
                              args=args, suffix=suffix, **kwargs)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()
