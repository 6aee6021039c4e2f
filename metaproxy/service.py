"""The daemon's side of systemd: readiness, status, watchdog, counters.

sd_notify messages go through python3-systemd when NOTIFY_SOCKET is set;
outside systemd they are skipped.

Under the seccomp filter: libsystemd's sd_notify opens a new AF_UNIX
datagram socket for every message (socket, sendmsg, close), unlike the
journal's socket, which stays open. The filter must therefore allow
socket(AF_UNIX, SOCK_DGRAM|SOCK_CLOEXEC) after start-up; it has to anyway,
for upstreams on a Unix socket. A message that cannot be sent (the manager
went away) is logged once and never stops the daemon or the periodic jobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

# Imported with this module, before the seccomp filter: a late import would
# have to open and stat files under it.
from systemd import daemon as sd

log = logging.getLogger("metaproxy")
STATUS_EVERY = 5.0


class Supervisor:
    """Takes what it needs from the server as plain callables, so it knows nothing of relays.

    ``status``: the one-line counters for STATUS=; ``counters``: the SIGUSR1
    line; ``sweep``: close idle relays, every ``sweep_every()`` seconds, asked
    again at each tick so that a reload's idle_timeout takes effect.
    """

    def __init__(self, *, status: Callable[[], str], counters: Callable[[], str], sweep: Callable[[], object],
                 sweep_every: Callable[[], float], reload: Callable[[], None]) -> None:
        self._status_text = status
        self._counters = counters
        self._sweep = sweep
        self._sweep_every = sweep_every
        self._reload = reload
        self._loop = asyncio.get_running_loop()
        self._timers: list[asyncio.TimerHandle] = []  # the pending tick of each periodic job
        self._notify: Callable[[str], object] | None = None
        if os.environ.get("NOTIFY_SOCKET"):
            self._notify = sd.notify
        self._notify_failed = False
        self._watchdog = _watchdog_interval()

    def ready(self) -> None:
        self._send("READY=1\nSTATUS=" + self._status_text())
        self._every(lambda: STATUS_EVERY, self._status)
        self._every(self._sweep_every, self._sweep)
        if self._watchdog:
            watchdog = self._watchdog
            self._every(lambda: watchdog, lambda: self._send("WATCHDOG=1"))

    def reload(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this
        # reload to its request; older managers ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        try:
            self._reload()
        finally:  # never leave systemd waiting in "reloading"
            self._send("READY=1\nSTATUS=" + self._status_text())

    def log_counters(self) -> None:
        log.info("counters: %s", self._counters())

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=draining: " + self._status_text())

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()

    def _status(self) -> None:
        self._send("STATUS=" + self._status_text())

    def _every(self, seconds: Callable[[], float], action: Callable[[], object]) -> None:
        slot = len(self._timers)

        def tick() -> None:
            # Schedule the next tick first: a failing action must not end the job
            # (a stopped watchdog ping gets the daemon killed).
            self._timers[slot] = self._loop.call_later(seconds(), tick)
            action()
        self._timers.append(self._loop.call_later(seconds(), tick))

    def _send(self, message: str) -> None:
        if self._notify is None:
            return
        try:
            self._notify(message)
        except OSError as e:
            if not self._notify_failed:
                log.warning("cannot notify systemd (NOTIFY_SOCKET): %s; carrying on without it",
                            e.strerror or e)
            self._notify_failed = True
        else:
            self._notify_failed = False


def _watchdog_interval() -> float:
    """Half of WATCHDOG_USEC, when the watchdog is meant for this process (as sd_watchdog_enabled)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return 0.0
    if pid and pid != str(os.getpid()):
        return 0.0
    return int(usec) / 2e6
