"""Start-up, top to bottom: root phase, then serve.

1. Logging, and the notice for legacy configs and debug mode.
2. The root phase (metaproxy.privileged): bind the listeners, drop to the
   service user, prove the drop, empty the capabilities.
3. The first journal record, which opens the journal socket that later
   records reuse, and the event loop. Both come before the sandbox so that
   nothing needs opening under it at first use: the filter does allow an
   AF_UNIX datagram socket (sd_notify opens one per message) and epoll.
4. Landlock: read only the config file, the Python modules and /proc/self;
   TCP connect only to the upstreams' ports. A reload needing more is refused.
5. The seccomp filter. No byte from the network has been read so far.
6. READY=1 to systemd, then serve until a signal says stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import signal
import sys

from metaproxy import logsetup, privileged
from metaproxy.config import Config, load, replace_port
from metaproxy.config.legacy import equivalent_text
from metaproxy.config.model import DaemonSettings, InetAddress, RedirectMode, SeccompAction, UnixAddress
from metaproxy.errors import ConfigError, PrivilegeError
from metaproxy.privacy import show_destinations
from metaproxy.relay.poller import new_event_loop
from metaproxy.relay.server import Server
from metaproxy.service import Supervisor
from metaproxy.upstream import unix_access

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

    sandbox = _Sandbox.of(config, os.path.abspath(config.source))  # before the drop's chdir("/")
    # Names of the sockets' owners and of the kept groups, for unreachable-socket messages:
    # /etc/passwd and /etc/group are out of reach once the sandbox is set.
    unix_access.learn_names(sandbox.sockets, d.groups)
    # Root phase: the only part that runs with privileges.
    listeners = privileged.bind_listeners(d.listen, d.port, transparent=d.mode is RedirectMode.TPROXY)
    if unprivileged:
        privileged.restrict_unprivileged()
    else:
        privileged.drop_privileges(d.user, d.groups)

    log.info("subgraph_metaproxy listening on %s port %d (%s mode) as uid %d",
             ", ".join(d.listen), d.port, d.mode.value, os.getuid())
    loop = new_event_loop()
    _log_contained(privileged.restrict_access(sandbox.read_paths(), sandbox.ports))
    if d.seccomp is SeccompAction.OFF:
        log.warning("the seccomp filter is OFF (seccomp = off): a compromised daemon could make any "
                    "system call; use it only to debug")
    privileged.load_syscall_filter(d.seccomp.value)

    try:
        return loop.run_until_complete(_serve(config, listeners, port_override, sandbox))
    finally:
        loop.close()


async def _serve(config: Config, listeners: list, port_override: int | None, sandbox: _Sandbox) -> int:
    server = Server(config, listeners)
    supervisor = Supervisor(status=server.counters.status, counters=server.counters_line,
                            sweep=server.sweep_idle, sweep_every=server.sweep_interval,
                            reload=lambda: _reload(server, port_override, sandbox))
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


def _reload(server: Server, port_override: int | None = None, sandbox: _Sandbox | None = None) -> None:
    """SIGHUP: take routes and upstreams from the file; the rest needs a restart."""
    old = server.config
    try:
        new = load(old.source)
    except ConfigError as e:
        replaced = sandbox is not None and sandbox.file_replaced()
        log.error("reload of %s failed, keeping the running configuration:\n%s%s", old.source, e,
                  "\nthe file was replaced (a new inode) since start, and the sandbox reads only the "
                  "one it started with: restart to apply (systemctl restart metaproxy)" if replaced else "")
        return
    outside = sandbox.outside(new) if sandbox is not None else []
    if outside:
        log.error("reload of %s refused, keeping the running configuration: %s %s outside the sandbox "
                  "set at start: restart to apply (systemctl restart metaproxy)", old.source,
                  " and ".join(outside), "is" if len(outside) == 1 else "are")
        return
    if port_override:  # -p still wins over the file, as at start
        new = replace_port(new, port_override)
    restart_only = [f for f in DaemonSettings.restart_only() if getattr(new.daemon, f) != getattr(old.daemon, f)]
    if restart_only:
        log.warning("reload: [daemon] %s changed; that takes a restart (systemctl restart metaproxy), "
                    "the running values stay", ", ".join(restart_only))
    # Listeners, user and sandbox stay as started (DaemonSettings says which keys may change).
    daemon = dataclasses.replace(old.daemon, **{f: getattr(new.daemon, f) for f in DaemonSettings.reloadable()})
    server.apply(dataclasses.replace(new, daemon=daemon))
    log.info("reloaded routes and upstreams from %s", old.source)
    for warning in new.warnings():
        log.warning("%s: %s", old.source, warning)


@dataclasses.dataclass(frozen=True, slots=True)
class _Sandbox:
    """What Landlock lets the daemon reach, fixed at start: a reload cannot widen it."""

    config_path: str
    config_file: tuple[int, int]  # (st_dev, st_ino): a Landlock rule holds the inode
    ports: frozenset[int]
    sockets: frozenset[str]  # not enforceable up to Landlock ABI 7, refused alike

    @classmethod
    def of(cls, config: Config, config_path: str) -> _Sandbox:
        st = os.stat(config_path)
        ports, sockets = _upstream_addresses(config)
        return cls(config_path, (st.st_dev, st.st_ino), ports, sockets)

    def read_paths(self) -> list[str]:
        """The config, /proc/self (the filter's proof reads status) and every import directory."""
        modules = [p for p in dict.fromkeys(os.path.abspath(p) for p in sys.path if p)
                   if os.path.isdir(p) and os.path.realpath(p) != "/"]
        return [self.config_path, "/proc/self", *modules]

    def file_replaced(self) -> bool:
        try:
            st = os.stat(self.config_path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) != self.config_file

    def outside(self, new: Config) -> list[str]:
        ports, sockets = _upstream_addresses(new)
        return ([f"upstream port {p}" for p in sorted(ports - self.ports)]
                + [f"upstream socket {p}" for p in sorted(sockets - self.sockets)])


def _upstream_addresses(config: Config) -> tuple[frozenset[int], frozenset[str]]:
    addresses = [u.address for u in config.upstreams.values()]
    return (frozenset(a.port for a in addresses if isinstance(a, InetAddress)),
            frozenset(a.path for a in addresses if isinstance(a, UnixAddress)))


def _log_contained(found: privileged.Contained) -> None:
    """Once, at start: the Landlock ABI used, and what it could not restrict on this kernel."""
    level = logging.INFO if found.abi >= 6 else logging.WARNING
    used = f"Landlock ABI {found.abi} (the kernel's: {found.kernel_abi})" if found.abi else "no Landlock"
    log.log(level, "sandbox: %s; not restricted here: %s", used, "; ".join(found.unrestricted))


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's default handler prints messages, tracebacks and reprs, which may quote values.

    Ours names the exception's type and the frames it went through, never its text.
    """
    error = context.get("exception")
    log.error("internal error: %s%s", context.get("message", "unexpected"),
              f" ({logsetup.internal_error(error)})" if error else "")



def _raise_nofile_limit() -> None:
    """Every relayed connection costs two descriptors: use all the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
