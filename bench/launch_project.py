"""Start metaproxy for the bench with a chosen event loop.

    launch_project.py [--loop default|uvloop] -c FILE

``--loop uvloop`` installs uvloop's policy before the daemon starts; the
daemon's ``asyncio.new_event_loop()`` then builds a uvloop loop. Everything
else is the real ``metaproxy.cli.main``, root phase and seccomp filter included.
"""

from __future__ import annotations

import asyncio
import sys


def main(argv: list[str]) -> int:
    loop = "default"
    while argv[:1] == ["--loop"]:
        loop, argv = argv[1], argv[2:]
    if loop == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from metaproxy.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
