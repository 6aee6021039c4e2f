"""`make demo-gateway`: a sandbox behind a bridge goes through the upstream, isolated per client.

    sandbox, vm1, vm2   three network namespaces on the router's bridge br0 (203.0.113.0/24)
    router              the daemon (isolation = client) and the strict rules of
                        --print-rules nftables for lan_interfaces = br0
    upstream            dante with pam.username: its log shows each session's username
    web                 nginx

Only documentation addresses (RFC 5737, 2001:db8::/32), no route off the
machine, and everything is torn down at the end, even on failure.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.narrate import say  # noqa: E402

from metaproxy.config import load  # noqa: E402
from metaproxy.firewall import render  # noqa: E402
from tests.system.daemon import daemon_section, start_daemon  # noqa: E402
from tests.system.gateway_lab import GatewayLab  # noqa: E402
from tests.system.lab import GATEWAY4, WEB4, LabError  # noqa: E402
from tests.system.peers import DANTE_AUTH_PORT, start_dante_auth, start_nginx  # noqa: E402

PORT = 8675



def main() -> int:
    with GatewayLab(prefix="mpgwdemo") as lab:
        say("building the lab: three LAN namespaces on a bridge, a router, the upstream and the web")
        start_dante_auth(lab)
        start_nginx(lab, [80])
        config = daemon_section(PORT).replace("listen = 127.0.0.1, ::1", "listen = 0.0.0.0, ::") + \
            textwrap.dedent(f"""\
            [upstreams]
                [[dante]]
                type = socks5
                address = {GATEWAY4}:{DANTE_AUTH_PORT}
                isolation = client
            [routes]
            * = dante
            [firewall]
            lan_interfaces = br0
            """)
        path = lab.file("metaproxy.conf", config)
        say("the daemon's config", config)
        rules = render(load(str(path)), "nftables", strict=True)
        lab.router.run(["nft", "-f", "-"], input=rules.encode())
        say("the router's nat prerouting chain (subgraph_metaproxy --print-rules nftables --strict)",
            lab.router.run(["nft", "list", "chain", "inet", "metaproxy", "nat_prerouting"]).stdout.decode())
        start_daemon(lab, "metaproxy", config, port=PORT, redirect=False)

        log = lab.tmp / "dante-auth.log"
        for client in lab.lan:
            mark = len(log.read_text(errors="replace"))
            for _ in range(2):
                client.ns.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "10",
                              f"http://{WEB4}/"], check=False)
            names = re.findall(r"tcp/connect \[: pam\.username%(\S+?)@", log.read_text(errors="replace")[mark:])
            say(f"{client.name} ({client.ipv4}): curl http://{WEB4}/ twice; dante saw the usernames", "\n".join(names))
        sandbox = lab.lan[-1]
        quic = sandbox.ns.run(["sh", "-c", f"echo quic | timeout 3 socat - UDP:{WEB4}:443 2>&1; echo exit $?"],
                              check=False)
        say(f"the sandbox sends UDP to {WEB4}:443 (QUIC): the router refuses it, nothing is routed",
            quic.stdout.decode(errors="replace"))
        lab.router.run(["nft", "delete", "table", "inet", "metaproxy"])
    say("done: namespaces, processes and files removed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LabError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        sys.exit(1)
