"""Start metaproxy for the bench with a chosen event loop.

    launch_project.py [--loop default|uvloop] [--experiment lean-socks5] -c FILE

``--loop uvloop`` installs uvloop's policy before the daemon starts; the
daemon's ``asyncio.new_event_loop()`` then builds a uvloop loop.
``--experiment lean-socks5`` swaps python-socks for bench/experiments/
lean_socks5.py on SOCKS5 upstreams, to measure what python-socks costs.
Everything else is the real ``metaproxy.cli.main``.

While the tree has no ``metaproxy.privileged`` yet, a stand-in binds the
listeners and skips the drop and the seccomp filter; run.py prints that this
happened, so such figures are never mistaken for production ones.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import types
from importlib.util import find_spec
from pathlib import Path
from typing import Sequence


def _stand_in_privileged() -> None:
    def bind_listeners(addresses: Sequence[str], port: int, *, transparent: bool) -> list[socket.socket]:
        out = []
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(4096)
            sock.setblocking(False)
            out.append(sock)
        return out

    def nothing(*_args: object) -> None:
        return None

    module = types.ModuleType("metaproxy.privileged")
    module.bind_listeners = bind_listeners  # type: ignore[attr-defined]
    module.drop_privileges = nothing  # type: ignore[attr-defined]
    module.restrict_unprivileged = nothing  # type: ignore[attr-defined]
    module.load_syscall_filter = nothing  # type: ignore[attr-defined]
    import metaproxy
    sys.modules["metaproxy.privileged"] = module
    metaproxy.privileged = module  # type: ignore[attr-defined]


def main(argv: list[str]) -> int:
    loop, experiment = "default", ""
    while argv[:1] in (["--loop"], ["--experiment"]):
        if argv[0] == "--loop":
            loop = argv[1]
        else:
            experiment = argv[1]
        argv = argv[2:]
    if experiment == "lean-socks5":
        sys.path.insert(0, str(Path(__file__).resolve().parent / "experiments"))
        import lean_socks5
        lean_socks5.install()
    elif experiment:
        raise SystemExit(f"launch_project.py: unknown experiment {experiment!r}")
    if loop == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    spec = find_spec("metaproxy.privileged")
    if spec is None or spec.origin in (None, "namespace"):
        _stand_in_privileged()
        argv = [*argv, "--unprivileged"]
    from metaproxy.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
