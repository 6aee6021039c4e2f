"""The daemon's side of systemd: readiness, status, watchdog, counters.

sd_notify messages go through python3-systemd when NOTIFY_SOCKET is set;
outside systemd they are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from metaproxy.relay.server import Server

log = logging.getLogger("metaproxy")
STATUS_EVERY = 5.0


class Supervisor:
    def __init__(self, server: Server, reload: Callable[[], None]) -> None:
        self.server = server
        self._reload = reload
        self._loop = asyncio.get_running_loop()
        self._timers: list[asyncio.TimerHandle] = []  # the pending tick of each periodic job
        self._notify: Callable[[str], object] | None = None
        if os.environ.get("NOTIFY_SOCKET"):
            from systemd import daemon as sd
            self._notify = sd.notify
        usec = os.environ.get("WATCHDOG_USEC", "")
        self._watchdog = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else 0.0

    def ready(self) -> None:
        self._send("READY=1\nSTATUS=" + self.server.counters.status())
        self._every(STATUS_EVERY, self._status)
        sweep = min(30.0, max(1.0, self.server.config.daemon.idle_timeout / 4))
        self._every(sweep, self.server.sweep_idle)
        if self._watchdog:
            self._every(self._watchdog, lambda: self._send("WATCHDOG=1"))

    def reload(self) -> None:
        self._send("RELOADING=1")
        self._reload()
        self._send("READY=1\nSTATUS=" + self.server.counters.status())

    def log_counters(self) -> None:
        c = self.server.counters
        log.info("counters: %s; %d bytes up, %d bytes down; %d pipes in use",
                 c.status(), c.bytes_up, c.bytes_down, self.server.pool.in_use)

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=draining: " + self.server.counters.status())

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()

    def _status(self) -> None:
        self._send("STATUS=" + self.server.counters.status())

    def _every(self, seconds: float, action: Callable[[], object]) -> None:
        slot = len(self._timers)

        def tick() -> None:
            action()
            self._timers[slot] = self._loop.call_later(seconds, tick)
        self._timers.append(self._loop.call_later(seconds, tick))

    def _send(self, message: str) -> None:
        if self._notify is not None:
            self._notify(message)
