"""Entry point for ``python3 -m metaproxy``."""

import sys

from metaproxy.cli import main

sys.exit(main())
