"""The command line: parse, load the config, then hand over to ``daemon``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import NoReturn

from metaproxy import __version__
from metaproxy.config import Config, load, replace_port
from metaproxy.config.legacy import equivalent_text
from metaproxy.errors import EX_CONFIG, EX_SOFTWARE, EX_USAGE, ConfigError, MetaproxyError

DEFAULT_CONFIG = "/etc/subgraph_metaproxy.conf"
log = logging.getLogger("metaproxy")


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error exits 64 (EX_USAGE), as the man page,
    docs/CONTRACTS.md and the unit's RestartPreventExitStatus say, not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="subgraph_metaproxy",
        description="Relay netfilter-redirected TCP connections through SOCKS and HTTP CONNECT proxies.")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("-t", "--test-config", action="store_true",
                   help="check the configuration, print the relay table and exit")
    p.add_argument("-p", "--port", type=_port, metavar="N", help="listen on port N instead of [daemon] port")
    p.add_argument("-d", "--debug", action="store_true",
                   help="verbose logs that include destinations (deanonymising)")
    p.add_argument("--unprivileged", action="store_true",
                   help="run as a non-root user without the privilege drop (development, socket "
                        "activation); no-new-privs and the seccomp filter still apply")
    p.add_argument("--log-target", choices=("auto", "journal", "stderr"), default="auto",
                   help="where logs go (default auto: journald when started by systemd)")
    p.add_argument("--print-rules", choices=("iptables", "ip6tables", "nftables"), metavar="BACKEND",
                   help="print a firewall ruleset (iptables, ip6tables or nftables) for this config and exit")
    p.add_argument("--strict", action="store_true",
                   help="with --print-rules: reject all other outgoing traffic (Tor enforcement)")
    p.add_argument("--unload", action="store_true",
                   help="with --print-rules: print the rules that remove a loaded ruleset (same options)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, found {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.strict or args.unload) and not args.print_rules:
        parser.error("--strict and --unload only apply to --print-rules")
    try:
        config = load(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        if not args.test_config and not args.print_rules:
            print(f"subgraph_metaproxy: not starting; check the file with: subgraph_metaproxy -t -c {args.config}",
                  file=sys.stderr)
        return EX_CONFIG
    if args.port:
        config = replace_port(config, args.port)
    if args.test_config:
        return _check(config)
    if args.print_rules:
        return _print_rules(config, args.print_rules, strict=args.strict, unload=args.unload)

    from metaproxy import daemon  # the serving side: not needed by -t and --print-rules
    # The drop chdirs to /, and SIGHUP re-reads config.source: a relative -c must not break reload.
    config = dataclasses.replace(config, source=os.path.abspath(config.source))
    try:
        return daemon.run(config, debug=args.debug, unprivileged=args.unprivileged, log_target=args.log_target,
                          port_override=args.port)
    except MetaproxyError as e:
        if log.handlers:
            log.critical("%s", e)
        else:
            print(f"subgraph_metaproxy: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        # A bug: exit 70 (EX_SOFTWARE) as the man page says, with where it
        # happened but not its text, which may quote a destination.
        from metaproxy.logsetup import internal_error
        if log.handlers:
            log.critical("internal error: %s", internal_error(e))
        else:
            print(f"subgraph_metaproxy: internal error: {internal_error(e)}", file=sys.stderr)
        return EX_SOFTWARE


def _check(config: Config) -> int:
    """-t: every check that a consumer of the file runs, then the table.

    The loader checks what it can with file:line. The firewall rules are then
    planned in both modes, so that nothing ``--print-rules`` (and so
    metaproxy-firewall.service) would refuse can pass ``-t``. Last, the system:
    the groups exist, and the service user can open every unix: socket
    (metaproxy.checks).
    """
    from metaproxy.firewall import plan_for, tor_virtual_summary
    try:
        notes = [plan_for(config, strict=strict).notes for strict in (False, True)][-1]
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    from metaproxy.checks import check_system
    found = check_system(config)
    if found.errors:
        for problem in found.errors:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    for warning in config.warnings() + found.warnings:
        print(warning, file=sys.stderr)
    code = _print_table(config)
    for note in found.notes:
        print(note)
    if config.firewall.lan_interfaces:  # what gateway mode will do, and what the rules need
        for line in config.gateway_summary() + [f"gateway: NOTE: {note}" for note in notes]:
            print(line)
    for line in tor_virtual_summary(config):  # what the rules do with Tor's virtual addresses
        print(line)
    return code


def _print_table(config: Config) -> int:
    print(f"{config.source}: configuration OK" + (" (legacy JSON format)" if config.legacy else ""))
    d = config.daemon
    groups = f", groups {', '.join(d.groups)}" if d.groups else ""
    print(f"listen {', '.join(d.listen)} port {d.port}, mode {d.mode.value}, user {d.user}{groups}")
    print("destination port -> upstream")
    for line in config.relay_table():
        print(line)
    if config.legacy:
        print("\nThe JSON format is deprecated; the equivalent configobj text is:\n")
        print(equivalent_text(config))
    return 0


def _print_rules(config: Config, backend: str, *, strict: bool, unload: bool) -> int:
    from metaproxy.firewall import render
    try:
        sys.stdout.write(render(config, backend, strict=strict, unload=unload))
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    return 0
