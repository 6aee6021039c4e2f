"""Start-up, top to bottom: root phase, then serve.

1. Logging, and the notice for legacy configs and debug mode.
2. The root phase (metaproxy.privileged): bind the listeners, drop to the
   service user, prove the drop, empty the capabilities.
3. The first journal record (opens the journal socket) and the event loop,
   both before the seccomp filter, which allows neither to be opened later.
4. The seccomp filter. No byte from the network has been read so far.
5. READY=1 to systemd, then serve until a signal says stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import signal

from metaproxy import logsetup, privileged
from metaproxy.config import Config, load, replace_port
from metaproxy.config.legacy import equivalent_text
from metaproxy.config.model import RedirectMode, SeccompAction
from metaproxy.errors import ConfigError, PrivilegeError
from metaproxy.privacy import show_destinations
from metaproxy.relay.server import Server
from metaproxy.service import Supervisor

log = logging.getLogger("metaproxy")


def run(config: Config, *, debug: bool, unprivileged: bool, log_target: str,
        port_override: int | None = None) -> int:
    shown = debug or config.daemon.log_destinations
    show_destinations(shown)
    logsetup.setup(debug, log_target)
    if shown:
        log.warning("destinations are logged (-d or log_destinations): these logs now deanonymise "
                    "the user; do not keep or share them")
    for warning in config.warnings():
        log.warning("%s: %s", config.source, warning)
    if config.legacy:
        log.warning("%s uses the deprecated JSON format; it works unchanged, but please replace it "
                    "with this configobj text:\n%s", config.source, equivalent_text(config))
    _raise_nofile_limit()

    d = config.daemon
    if not unprivileged and os.geteuid() != 0:
        raise PrivilegeError("refusing to start: the daemon must start as root to bind and then drop "
                             f"to the user {d.user!r}; for development run it with --unprivileged")

    # Root phase: the only part that runs with privileges.
    listeners = privileged.bind_listeners(d.listen, d.port, transparent=d.mode is RedirectMode.TPROXY)
    if unprivileged:
        privileged.restrict_unprivileged()
    else:
        privileged.drop_privileges(d.user)

    log.info("subgraph_metaproxy listening on %s port %d (%s mode) as uid %d",
             ", ".join(d.listen), d.port, d.mode.value, os.getuid())
    loop = asyncio.new_event_loop()
    if d.seccomp is SeccompAction.OFF:
        log.warning("the seccomp filter is OFF (seccomp = off): a compromised daemon could make any "
                    "system call; use it only to debug")
    privileged.load_syscall_filter(d.seccomp.value)

    try:
        return loop.run_until_complete(_serve(config, listeners, port_override))
    finally:
        loop.close()


async def _serve(config: Config, listeners: list, port_override: int | None) -> int:
    server = Server(config, listeners)
    supervisor = Supervisor(server, reload=lambda: _reload(server, port_override))
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_log_loop_error)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
    loop.add_signal_handler(signal.SIGUSR1, supervisor.log_counters)
    server.start()
    supervisor.ready()
    await stop.wait()
    supervisor.stopping()
    await server.drain(config.daemon.drain_timeout)
    supervisor.close()
    log.info("stopped: %s", server.counters.status())
    return 0


def _reload(server: Server, port_override: int | None = None) -> None:
    """SIGHUP: take routes and upstreams from the file; the rest needs a restart."""
    old = server.config
    try:
        new = load(old.source)
    except ConfigError as e:
        log.error("reload of %s failed, keeping the running configuration:\n%s", old.source, e)
        return
    if port_override:  # -p still wins over the file, as at start
        new = replace_port(new, port_override)
    restart_only = [f for f in _RESTART_ONLY if getattr(new.daemon, f) != getattr(old.daemon, f)]
    if restart_only:
        log.warning("reload: [daemon] %s changed; that takes a restart (systemctl restart metaproxy), "
                    "the running values stay", ", ".join(restart_only))
    # Listeners, user and sandbox stay as started.
    daemon = dataclasses.replace(old.daemon, max_connections=new.daemon.max_connections,
                                 idle_timeout=new.daemon.idle_timeout, drain_timeout=new.daemon.drain_timeout,
                                 connect_timeout=new.daemon.connect_timeout,
                                 log_connections=new.daemon.log_connections,
                                 log_refusals=new.daemon.log_refusals)
    server.apply(dataclasses.replace(new, daemon=daemon))
    log.info("reloaded routes and upstreams from %s", old.source)
    for warning in new.warnings():
        log.warning("%s: %s", old.source, warning)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's default handler prints tracebacks and reprs, which may quote values."""
    error = context.get("exception")
    log.error("internal error: %s%s", context.get("message", "unexpected"),
              f" ({type(error).__name__})" if error else "")


# The listening sockets (listen, port, mode) were bound as root, and the user and
# the sandbox were set before serving: none of them can change in place.
_RESTART_ONLY = ("listen", "port", "mode", "user", "seccomp", "log_destinations")


def _raise_nofile_limit() -> None:
    """Every relayed connection costs two descriptors: use all the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
