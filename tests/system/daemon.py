"""Start subgraph_metaproxy in the lab's client namespace, as a real process.

    ip netns exec <client> /usr/bin/python3 -m metaproxy -c <conf> [args]

By default it starts as root and drops to ``user = nobody`` itself. With
METAPROXY_TEST_UNPRIVILEGED=1 it is started as nobody with ``--unprivileged``
instead (for when the privilege drop is unavailable). METAPROXY_TEST_SECCOMP
sets the config's ``seccomp`` key (kill, log, trap, off); unset, the config
default applies, which enforces the filter. METAPROXY_TEST_PROGRAM replaces
"/usr/bin/python3 -m metaproxy" (split on spaces), e.g. with
/usr/sbin/subgraph_metaproxy to test the installed package.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tests.system.lab import PYTHON, REPO, Lab, LabError, Process, clean_env, run

UNPRIVILEGED = os.environ.get("METAPROXY_TEST_UNPRIVILEGED") == "1"
SECCOMP = os.environ.get("METAPROXY_TEST_SECCOMP", "")
PROGRAM = shlex.split(os.environ.get("METAPROXY_TEST_PROGRAM", "")) or [PYTHON, "-m", "metaproxy"]
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]

_ports = iter(range(8675, 8775))


def next_port() -> int:
    """Each daemon in a run gets its own port, so a stopped one never masks a new one."""
    return next(_ports)


def daemon_section(port: int, **extra: object) -> str:
    # Tests judge refusals by their lines: no rate limit unless a test asks for one.
    extra.setdefault("log_refusals", 100000)
    lines = ["[daemon]", "listen = 127.0.0.1, ::1", f"port = {port}", "user = nobody"]
    if SECCOMP:
        lines.append(f"seccomp = {SECCOMP}")
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def metaproxy_argv(args: Sequence[str]) -> list[str]:
    return [*PROGRAM, *args]


def print_rules(config: Path, backend: str, *, strict: bool = True, unload: bool = False) -> bytes:
    """The daemon's own ``--print-rules BACKEND [--strict] [--unload]`` output for a config file."""
    args = ["-c", str(config), "--print-rules", backend] + (["--strict"] if strict else []) + \
        (["--unload"] if unload else [])
    return run(metaproxy_argv(args), cwd=REPO, env=clean_env(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")).stdout


def check_config(path: Path, *extra: str, timeout: float = 20) -> tuple[int, str, str]:
    """Run ``-t`` on a file (outside the lab: it needs no network). Returns (code, stdout, stderr)."""
    proc = run(metaproxy_argv(["-t", "-c", str(path), *extra]), check=False, timeout=timeout,
               cwd=REPO, env=clean_env(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1"))
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


@dataclass
class Daemon:
    """One running daemon; ``log()`` is everything it wrote to stderr."""
    lab: Lab
    name: str
    config: Path
    port: int
    args: tuple[str, ...] = ()
    unprivileged: bool = UNPRIVILEGED
    process: Process | None = field(default=None, init=False)

    def start(self, timeout: float = 15) -> "Daemon":
        argv = metaproxy_argv(["-c", str(self.config), *self.args])
        if self.unprivileged:
            argv = NOBODY + argv + ["--unprivileged"]
        self.process = self.lab.client.spawn(
            self.name, argv, cwd=REPO,
            env=clean_env(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1"))
        self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout: float) -> None:
        """Poll the daemon's own /proc/PID/net/tcp{,6} (its namespace's view) for both listeners.

        Connecting would be refused by the loop guard and logged; reading
        the socket tables is silent.
        """
        assert self.process is not None
        want = f":{self.port:04X} "
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            if not self.process.alive():
                raise LabError(f"the daemon exited {self.process.popen.returncode} during start:\n"
                               f"{self.log()}")
            found = 0
            for table in ("tcp", "tcp6"):
                try:
                    rows = Path(f"/proc/{self.process.pid}/net/{table}").read_text().splitlines()[1:]
                except OSError:
                    rows = []
                # Columns: sl local_address rem_address st ...; st 0A is LISTEN.
                if any(want in f"{r.split()[1]} " and r.split()[3] == "0A" for r in rows):
                    found += 1
            if found == 2:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise LabError(f"the daemon did not listen on 127.0.0.1 and ::1 port {self.port} in {timeout}s:\n"
                       f"{self.log()}")

    def log(self) -> str:
        return self.process.output() if self.process else ""

    def log_since(self, mark: int) -> str:
        return self.log()[mark:]

    def mark(self) -> int:
        """A position in the log; ``log_since(mark)`` is what came after it."""
        return len(self.log())

    def wait_log(self, needle: str, since: int = 0, timeout: float = 5) -> str:
        """Wait (bounded) until ``needle`` appears in the log after ``since``."""
        for _ in range(int(timeout / 0.05) + 1):
            text = self.log_since(since)
            if needle in text:
                return text
            time.sleep(0.05)
        return self.log_since(since)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self) -> int | None:
        if self.process is None:
            return None
        code = self.process.stop()
        return code


StartDaemon = Callable[..., "Daemon"]
"""The start_own_daemon fixture: start(name, config_for_port, args=(), suffix=".conf", unprivileged=None)."""


def start_daemon(lab: Lab, name: str, config_text: str, *, port: int, args: Sequence[str] = (),
                 redirect: bool = True, suffix: str = ".conf", unprivileged: bool = UNPRIVILEGED) -> Daemon:
    """Write the config, start the daemon, and point the REDIRECT rules at it."""
    config = lab.file(f"{name}{suffix}", config_text)
    daemon = Daemon(lab, name, config, port, tuple(args), unprivileged)
    try:
        daemon.start()
    except BaseException:
        daemon.stop()
        raise
    if redirect:
        lab.redirect_to(port)
    return daemon
