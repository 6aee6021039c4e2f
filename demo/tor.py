"""`make demo-tor`: `make demo`, but the upstream is a real Tor, in a private Tor network.

    client (192.0.2.1)  curl and wget, knowing nothing of proxies or Tor; the daemon's own
                        ruleset (--print-rules iptables/ip6tables --strict), which diverts
                        Tor's virtual addresses (10.192.0.0/10) before the local networks
                        and sends DNS to Tor's DNSPort; a resolv.conf naming a resolver
                        nobody runs; the daemon (root -> nobody)
    gateway (192.0.2.2) a private Tor network: 3 authorities, a relay, an exit, an onion
                        service, and the Tor client the daemon uses (SocksPort 9050
                        ExtendedErrors, DNSPort 53, AutomapHostsOnResolve 1)
    web (198.51.100.2)  nginx, also the onion service's backend

Only documentation addresses and loopback, no route off the machine, and every
namespace and process is removed at the end, even on failure.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.narrate import say  # noqa: E402

from tests.system.daemon import daemon_section, print_rules, start_daemon  # noqa: E402
from tests.system.lab import GATEWAY4, WEB4, Lab, LabError  # noqa: E402
from tests.system.peers import start_nginx  # noqa: E402
from tests.system.tor_network import (DNS_PORT, NOBODYS_RESOLVER, VIRTUAL_NET4, StreamWatch,  # noqa: E402
                                      TorNetwork)

PORT = 8675



def show(result: "object") -> None:
    out = getattr(result, "stdout", b"") or b""
    err = getattr(result, "stderr", b"") or b""
    print(textwrap.indent((out + err).decode(errors="replace").rstrip() or "(nothing)", "   "))


def circuit_paths(network: TorNetwork) -> dict[str, str]:
    """circuit id -> "guard,middle,exit" nicknames, from GETINFO circuit-status."""
    with network.control() as control:
        text = control.getinfo("circuit-status")
    paths = {}
    for line in text.splitlines():
        parts = line.replace("250+circuit-status=", "").split()
        if len(parts) >= 3 and parts[0].isdigit():
            paths[parts[0]] = ",".join(hop.split("~")[-1] for hop in parts[2].split(","))
    return paths


def main() -> int:
    netns_etc: Path | None = None
    with Lab(prefix="mptordemo") as lab:
        try:
            say("building the lab and a private Tor network in the gateway namespace "
                "(10-30 s to bootstrap)")
            start_nginx(lab, [80, 8001])
            started = time.monotonic()
            network = TorNetwork(lab, lab.gateway, WEB4, 80, ("80", "8000-8999"))
            network.start(timeout=120)
            print(f"   bootstrapped in {time.monotonic() - started:.1f}s; "
                  f"onion service {network.onion} -> {WEB4}:80")
            say("the Tor client's torrc (its SOCKS, DNS and control lines)",
                "\n".join(line for line in network.nodes["client"].torrc.read_text().splitlines()
                          if line.split(" ")[0] in ("SocksPort", "DNSPort", "AutomapHostsOnResolve",
                                                     "VirtualAddrNetworkIPv4", "ControlSocket",
                                                     "ConfluxEnabled")))
            config = daemon_section(PORT) + textwrap.dedent(f"""\
                [upstreams]
                    [[tor]]
                    type = socks5
                    address = {GATEWAY4}:9050
                    isolation = destination
                    connect_timeout = 120
                [routes]
                * = tor
                [firewall]
                dns = {GATEWAY4}:{DNS_PORT}
                # tor_virtual_networks = 10.192.0.0/10, fe80::/10 (the default, Tor's own)
                """)
            daemon = start_daemon(lab, "metaproxy", config, port=PORT, redirect=False)
            say("the daemon's config", config)
            # The product's own rules, strict: nothing leaves the client but through the daemon.
            for backend in ("iptables", "ip6tables"):
                lab.client.run([f"{backend}-restore", "--noflush"], input=print_rules(daemon.config, backend))
            # The lab has no default route; a real host's would cover Tor's virtual range.
            lab.client.run(["ip", "route", "add", VIRTUAL_NET4, "via", GATEWAY4])
            netns_etc = Path("/etc/netns") / lab.client.name
            netns_etc.mkdir(parents=True, exist_ok=True)
            (netns_etc / "resolv.conf").write_text(f"nameserver {NOBODYS_RESOLVER}\n")
            say("the client namespace: the daemon's rules (subgraph_metaproxy --print-rules iptables --strict "
                "| iptables-restore --noflush; iptables -t nat -S METAPROXY) and a resolv.conf naming "
                "nobody's resolver",
                lab.client.run(["iptables", "-t", "nat", "-S", "METAPROXY"]).stdout.decode()
                + (netns_etc / "resolv.conf").read_text())
            watch = StreamWatch(network)

            say(f"getent hosts {network.onion}: the rules send the query to Tor's DNSPort, which "
                "answers with a virtual address")
            resolved = lab.client.run(["getent", "ahostsv4", network.onion], check=False)
            show(resolved)
            virtual = resolved.stdout.decode().split()[0] if resolved.stdout else ""
            say(f"wget http://{network.onion}/ from the client: no proxy settings, no Tor settings")
            show(lab.client.run(["wget", "--no-config", "-q", "-O", "-", "--timeout=60",
                                 f"http://{network.onion}/"], check=False, timeout=70))
            if virtual:
                say(f"curl http://{virtual}/ with Host: {network.onion} (curl will not resolve "
                    ".onion itself, RFC 7686)")
                show(lab.client.run(["curl", "-sS", "--max-time", "60", "-H", f"Host: {network.onion}",
                                     f"http://{virtual}/"], check=False, timeout=70))
            for port in (80, 80, 8001):
                say(f"curl http://{WEB4}:{port}/: through the daemon, the Tor client and the exit")
                show(lab.client.run(["curl", "-sS", "--max-time", "60", f"http://{WEB4}:{port}/"],
                                    check=False, timeout=70))
            time.sleep(0.5)
            paths = circuit_paths(network)
            rows = [f"{'stream target':<70} {'circuit':>7}  path (guard,middle,exit)  SOCKS username"]
            for event in watch.streams:
                if event.status == "SUCCEEDED":
                    rows.append(f"{event.target:<70} {event.circuit:>7}  "
                                f"{paths.get(event.circuit, '(closed)'):<25} {event.username}")
            say("the circuits the connections used, as the Tor client reports them (isolation = "
                "destination: the two fetches of port 80 share one)", "\n".join(rows))
            watch.close()
        except LabError as e:
            print(f"demo failed: {e}", file=sys.stderr)
            return 1
        finally:
            if netns_etc is not None:
                (netns_etc / "resolv.conf").unlink(missing_ok=True)
                netns_etc.rmdir()
        say("tearing down: tor, the daemon and nginx by PID, then the namespaces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
