"""`make demo`: subgraph_metaproxy doing its job, live, in namespaces it builds.

    client (192.0.2.1)  curl, knowing nothing of proxies; an iptables REDIRECT;
                        the daemon, started as root, dropping to nobody
    gateway (192.0.2.2) dante, a real SOCKS5 server (it does not forward packets)
    web (198.51.100.2)  nginx

Only documentation addresses (RFC 5737, 2001:db8::/32), no route off the
machine, and everything is torn down at the end, even on failure.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.narrate import say  # noqa: E402

from tests.system.daemon import daemon_section, start_daemon  # noqa: E402
from tests.system.lab import WEB4, Lab, LabError  # noqa: E402
from tests.system.peers import DANTE_PORT, start_dante, start_nginx  # noqa: E402

PORT = 8675



def main() -> int:
    with Lab(prefix="mpdemo") as lab:
        say("building the lab: client, gateway and web namespaces (RFC 5737 addresses, no route out)")
        start_dante(lab)
        start_nginx(lab, [80])
        config = daemon_section(PORT) + textwrap.dedent(f"""\
            [upstreams]
                [[dante]]
                type = socks5
                address = 192.0.2.2:{DANTE_PORT}
            [routes]
            80 = dante
            """)
        daemon = start_daemon(lab, "metaproxy", config, port=PORT)
        say("the daemon's config", config)
        say("the redirect rules in the client namespace (iptables -t nat -S OUTPUT)",
            lab.client.run(["iptables", "-t", "nat", "-S", "OUTPUT"]).stdout.decode())
        status = Path(f"/proc/{daemon.process.pid}/status").read_text() if daemon.process else ""
        say("the running daemon dropped its privileges (/proc/PID/status)",
            "\n".join(line for line in status.splitlines()
                      if line.split(":")[0] in ("Uid", "Gid", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp")))

        say(f"curl http://{WEB4}/ from the client: no proxy settings, the redirect does it")
        page = lab.client.run(["curl", "-sS", "--max-time", "10", f"http://{WEB4}/"], check=False)
        print(textwrap.indent((page.stdout or page.stderr).decode(errors="replace"), "   "))
        refused = lab.client.run(["curl", "-sS", "--max-time", "5", f"http://{WEB4}:8080/"], check=False)
        say(f"curl http://{WEB4}:8080/: no route for port 8080, refused at once",
            refused.stderr.decode(errors="replace"))

        daemon.wait_log("close (", timeout=5)
        say("the daemon's log (destinations are [scrubbed] without -d)", daemon.log())
        dante_log = (lab.tmp / "dante.log").read_text(errors="replace")
        say("dante's log: the connection really went through the SOCKS server", dante_log)

        ok = page.returncode == 0 and b"lab page" in page.stdout and "pass(1): tcp/connect" in dante_log
        say("result", "the page came through the SOCKS5 proxy" if ok else "FAILED: see above")
        say("cleaning up: processes stopped by PID, namespaces deleted")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LabError as e:
        print(f"make demo: {e}", file=sys.stderr)
        sys.exit(1)
