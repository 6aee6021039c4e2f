"""2,000 concurrent clients through the real daemon, every byte checked.

In the lab, tests/soak/traffic.py runs in the client namespace as a few
processes. Its clients connect to an echo server in the web namespace; the
REDIRECT rules send them to the daemon, which relays them through dante in
the gateway. All are connected at once (a barrier after connect), then each
streams 1 MB and reads the echo back; some half-close and read late, some go
slowly, some reset part way. Afterwards:

* every client that did not abort got back exactly what it sent (sha256);
* the daemon holds as many sockets as before and no pipe in use;
* the SIGUSR1 counters line says "0 open": no connection or task is left;
* RSS is back near where it started.

Why dante: microsocks closes both directions at the first EOF, so a
half-closed echo would lose its reply there (a peer limit, not ours).
"""

from __future__ import annotations

import os
import time

from tests.soak import probe
from tests.system import peers
from tests.system.conftest import StartDaemon
from tests.system.daemon import daemon_section
from tests.system.lab import GATEWAY4, WEB4, WEB6, Process
from tests.system.peers import World

import pytest

CLIENTS = int(os.environ.get("METAPROXY_LOAD_CLIENTS", "2000"))
PROCESSES = 4
SIZE = 1 << 20
RAMP = 6.0  # seconds over which the connects are spread; dante forks children as they come
CLIENT_TIMEOUT = 100.0
RUN_TIMEOUT = 160.0
RSS_SLACK_KB = 32 * 1024
POOL_LIMIT = 256  # metaproxy.relay.pipes.PipePool default: pipes parked for reuse, not leaked


def load_config(port: int) -> str:
    # connect_timeout: dante needs a few seconds to fork for a burst of handshakes.
    return daemon_section(port, connect_timeout=30) + f"""\
[upstreams]
    [[dante]]
    type = socks5
    address = {GATEWAY4}:{peers.DANTE_PORT}
    isolation = none
[routes]
{probe.ECHO_PORT} = dante
"""


@pytest.fixture(scope="module")
def echo(world: World) -> Process:
    return probe.start_echo(world.lab, [WEB4, WEB6])


def test_two_thousand_concurrent_clients_lose_no_byte_and_leak_nothing(
        world: World, echo: Process, start_own_daemon: StartDaemon) -> None:
    """2,000 clients, all connected at once, 1 MB each way with random half-closes and
    aborts: 0 bytes lost, no socket or task left, RSS back near the start."""
    daemon = start_own_daemon("load", load_config)
    assert daemon.process is not None
    pid = daemon.process.pid
    lab = world.lab

    # Warm up, so that imports, the pipe pool and the allocator are in place.
    warm = probe.spawn_traffic(lab.client, "load-warm", WEB4, probe.ECHO_PORT, 50, "--size", "262144",
                               "--timeout", "30")
    probe.wait_all([warm], 60)
    assert probe.summary_of(warm)["failed"] == 0, warm.output()[-3000:]
    before = probe.settle(pid, daemon)

    per = CLIENTS // PROCESSES
    runs = [probe.spawn_traffic(lab.client, f"load-{i}", WEB6 if i == 0 else WEB4, probe.ECHO_PORT, per,
                                "--size", str(SIZE), "--ramp", str(RAMP), "--timeout", str(CLIENT_TIMEOUT),
                                "--seed", str(1000 + i))
            for i in range(PROCESSES)]
    started = time.monotonic()
    peak_open = peak_fds = peak_rss = 0
    for _ in range(int(RUN_TIMEOUT / 0.5)):  # sample while the clients run (bounded)
        if not any(r.alive() for r in runs) or time.monotonic() - started > RUN_TIMEOUT:
            break
        snap = probe.snapshot(pid, daemon)
        peak_open = max(peak_open, snap.counters.open)
        peak_fds, peak_rss = max(peak_fds, snap.fds), max(peak_rss, snap.rss_kb)
        time.sleep(0.5)
    probe.wait_all(runs, max(1.0, RUN_TIMEOUT - (time.monotonic() - started)))
    seconds = time.monotonic() - started
    total = probe.merge([probe.summary_of(r) for r in runs])
    after = probe.settle(pid, daemon)
    log = daemon.log()

    print(f"\nload: {total['clients']} clients in {seconds:.1f}s, peak {peak_open} open at once, "
          f"{total['completed']} completed, {total['aborted']} aborted on purpose, {total['failed']} failed; "
          f"{total['bytes_verified']} bytes verified, {total['bytes_lost']} lost\n"
          f"  daemon before: {before}\n  daemon peak:   {peak_fds} fds, RSS {peak_rss / 1024:.1f} MiB\n"
          f"  daemon after:  {after}")

    assert total["clients"] == per * PROCESSES
    assert total["failed"] == 0 and total["bytes_lost"] == 0, \
        f"clients failed or bytes were lost: {total['errors']}\n{log[-3000:]}"
    assert total["completed"] + total["aborted"] == total["clients"]
    assert total["bytes_verified"] == total["completed"] * SIZE
    assert peak_open >= 0.9 * total["clients"], f"only {peak_open} connections were open at once"
    assert after.counters.failed == before.counters.failed, "upstream failures under load"
    assert after.counters.open == 0 and after.counters.pipes == 0, f"left open: {after}"
    assert after.sockets == before.sockets, f"sockets leaked: before {before}, after {after}"
    assert after.pipes <= max(before.pipes, 2 * POOL_LIMIT), f"pipes leaked: before {before}, after {after}"
    assert after.rss_kb <= before.rss_kb + RSS_SLACK_KB, f"RSS did not come back: before {before}, after {after}"
    for bad in ("Traceback", "internal error", "Exception in callback", "Task exception"):
        assert bad not in log, f"{bad!r} in the daemon log:\n{log[log.find(bad) - 2000:][:4000]}"
