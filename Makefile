# subgraph_metaproxy. Run as root on Debian 12; see README.md.
#
# Everything runs with Debian's interpreter: the python3 first on PATH may be
# another build that cannot import python3-prctl, python3-seccomp and friends.
PYTHON ?= /usr/bin/python3
SYSPATH := /usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
PYTEST := env PATH=$(SYSPATH) PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m pytest -p no:cacheprovider

.PHONY: check deps lint typecheck unit system demo demo-gateway demo-tor tor-isolation-table deb bench bench-smoke soak clean

# CI runs this (.ci/run). The bench smoke only proves the benchmark still runs;
# its figures mean nothing at that length.
check: deps lint typecheck unit system bench-smoke

# Installs what the checks need, once, when run as root on Debian. No service
# of a package starts at install (policy-rc.d, unless the machine has its own):
# the tests start their peers themselves, and Debian's tor would otherwise try
# to reach the real Tor network from a CI machine.
deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  pkgs=$$(grep -v '^#' .ci/apt-packages | tr '\n' ' '); \
	  missing=$$(for p in $$pkgs; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing: $$missing"; \
	    made=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made=yes; \
	    fi; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	    rc=$$?; [ -n "$$made" ] && rm -f /usr/sbin/policy-rc.d; [ $$rc = 0 ] || exit $$rc; \
	  fi; \
	fi

lint:
	env PATH=$(SYSPATH) pyflakes3 metaproxy tests

typecheck:
	env PATH=$(SYSPATH) mypy --python-executable $(PYTHON) --config-file pyproject.toml metaproxy

unit:
	$(PYTEST) -q tests/unit

# Root system tests in network namespaces; they refuse to be skipped silently.
system:
	$(PYTEST) -q tests/system

# Throughput, connections/s, idle memory and CPU against redsocks and the direct
# path, in one run (under 5 minutes). Figures: README.md, "Performance".
bench: deps
	env PATH=$(SYSPATH) PYTHONDONTWRITEBYTECODE=1 $(PYTHON) bench/run.py

bench-smoke: deps
	env PATH=$(SYSPATH) PYTHONDONTWRITEBYTECODE=1 $(PYTHON) bench/run.py --smoke

# Ten minutes of mixed traffic; fails if memory or descriptors trend up.
soak: deps
	env PATH=$(SYSPATH) PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m tests.soak.run $(if $(MINUTES),--minutes $(MINUTES))

clean:
	rm -rf build .mypy_cache .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

# A live redirect through a real SOCKS5 server, in namespaces it builds and removes.
demo: deps
	env PATH=$(SYSPATH) PYTHONDONTWRITEBYTECODE=1 $(PYTHON) demo/run.py

# Gateway mode: three namespaces on a bridge behind a router that runs the daemon
# and the strict rules for lan_interfaces; dante's log shows one username per client.
demo-gateway: deps
	env PATH=$(SYSPATH) PYTHONDONTWRITEBYTECODE=1 $(PYTHON) demo/gateway.py

# The same through a real Tor: a private Tor network (Debian's tor, testing mode),
# a curl and a wget of an .onion with no proxy settings, and the circuits used.
demo-tor: deps
	env PATH=$(SYSPATH) PYTHONDONTWRITEBYTECODE=1 $(PYTHON) demo/tor.py

# Circuits and time for 100 connections to 5 destinations from 2 users under each
# isolation mode, on the private Tor network (about a minute).
tor-isolation-table: deps
	env PATH=$(SYSPATH) PYTHONDONTWRITEBYTECODE=1 $(PYTHON) -m tests.system.tor_isolation_table

# ---- deb (maintained with debian/ and tools/build-deb.sh) ----
# The .deb from a copy of this tree, unit tests included (nocheck skips them),
# into build/deb/; lintian --fail-on error,warning --pedantic must print nothing.
deb: deps
	tools/build-deb.sh -o build/deb
