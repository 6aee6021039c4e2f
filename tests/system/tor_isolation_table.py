"""Circuits and time for 100 connections under each isolation mode, on the private Tor network.

    cd /work/main && env PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \\
        /usr/bin/python3 -m tests.system.tor_isolation_table

Builds a lab of its own (namespaces mptab<pid>...), nginx on 20 ports, the
private Tor network of tor_network.py, and one daemon whose upstreams differ
only in isolation, each routed five destination ports. Per mode, two local
users (root and nobody) each open 50 connections (10 to each of the 5
destinations, 10 at a time, an HTTP/1.0 GET each, like a page's resources),
both users at once. Tor's control port reports the circuit every stream used
and the circuits built meanwhile. Bounded: 120 s to bootstrap, 90 s per mode.
Everything is torn down at the end.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.system.daemon import daemon_section, start_daemon  # noqa: E402
from tests.system.lab import GATEWAY4, PYTHON, WEB4, Lab, clean_env  # noqa: E402
from tests.system.peers import start_nginx  # noqa: E402
from tests.system.tor_network import StreamWatch, TorNetwork  # noqa: E402

MODES = ("connection", "destination", "user", "user, destination", "none")
DESTINATIONS = 5
PER_USER = 50
CONCURRENCY = 10
PORT = 8675
USERS = {"root": [], "nobody": ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]}


def name(mode: str) -> str:
    """The upstream's name: tor_user_destination for "user, destination"."""
    return "tor_" + mode.replace(", ", "_")


def ports(mode: str) -> list[int]:
    base = 8100 + 10 * MODES.index(mode)
    return list(range(base, base + DESTINATIONS))


# Run in the client namespace as one user: argv host count concurrency port...
LOAD = r"""
import asyncio, sys
host, count, concurrency, ports = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(p) for p in sys.argv[4:]]
async def fetch(port, gate):
    async with gate:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 60)
        writer.write(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        return data.startswith(b"HTTP/1.1 200")
async def main():
    gate = asyncio.Semaphore(concurrency)
    results = await asyncio.wait_for(asyncio.gather(
        *(fetch(ports[i % len(ports)], gate) for i in range(count)), return_exceptions=True), 85)
    print(sum(1 for r in results if r is True))
asyncio.run(main())
"""


def config(port: int) -> str:
    text = daemon_section(port) + "[upstreams]\n"
    for mode in MODES:
        text += (f"    [[{name(mode)}]]\n    type = socks5\n    address = {GATEWAY4}:9050\n"
                 f"    isolation = {mode}\n    connect_timeout = 60\n")
    text += "[routes]\n" + "".join(f"{p} = {name(mode)}\n" for mode in MODES for p in ports(mode))
    return text


def measure(lab: Lab, watch: StreamWatch, mode: str) -> tuple[int, int, int, int, float]:
    """(connections that got a page, SOCKS usernames Tor saw, circuits the streams used,
    circuits built, seconds)."""
    mark = watch.mark()
    started = time.monotonic()
    procs = [lab.client.spawn(f"load-{name(mode)}-{user}", [*prefix, PYTHON, "-c", LOAD, WEB4, str(PER_USER),
                                                      str(CONCURRENCY), *map(str, ports(mode))],
                              env=clean_env(), stdout=-1)
             for user, prefix in USERS.items()]
    ok = 0
    for proc in procs:
        out, _ = proc.popen.communicate(timeout=90)
        ok += int(out.decode().strip() or 0)
    seconds = time.monotonic() - started
    wanted = set(ports(mode))
    events = [e for e in watch.succeeded(mark, ok, timeout=10)
              if int(e.target.rsplit(":", 1)[1]) in wanted]
    return (ok, len({e.username for e in events}), len({e.circuit for e in events}),
            watch.built_since(mark), seconds)


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (network namespaces)", file=sys.stderr)
        return 2
    with Lab(prefix=f"mptab{os.getpid()}") as lab:
        start_nginx(lab, [8001] + [p for mode in MODES for p in ports(mode)])
        began = time.monotonic()
        network = TorNetwork(lab, lab.gateway, WEB4, 8001, ("8000-8999",))
        try:
            network.start(timeout=120)
            print(f"private Tor network up in {time.monotonic() - began:.1f}s")
            start_daemon(lab, "metaproxy-table", config(PORT), port=PORT)
            watch = StreamWatch(network)
            rows = [(mode, *measure(lab, watch, mode)) for mode in MODES]
            watch.close()
        finally:
            network.stop()
    print(f"\n{2 * PER_USER} connections to {DESTINATIONS} destinations from 2 users "
          f"({CONCURRENCY} at a time per user), private Tor network:\n")
    print(f"{'isolation':<18} {'ok':>4} {'usernames':>10} {'circuits used':>14} {'circuits built':>15} "
          f"{'seconds':>8}")
    for mode, ok, users, used, built, seconds in rows:
        print(f"{mode:<18} {ok:>4} {users:>10} {used:>14} {built:>15} {seconds:>8.2f}")
    print("\n(usernames: distinct SOCKS usernames Tor saw, none counting as one; circuits built:\n"
          " CIRC BUILT events during the run, pre-built circuits not included)")
    return 0 if all(row[1] == 2 * PER_USER for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
