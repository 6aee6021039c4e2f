"""The printed rulesets load into the kernel and unload without a trace (root, netns).

Each test gets a fresh network namespace of its own, named after this
process (other people run tests on the same machine at the same time),
deleted in a ``finally`` whatever happens. Both iptables back-ends of
Debian (iptables-legacy and iptables-nft) and nft itself are exercised.

Before loading, the namespace holds some unrelated rules of "someone
else's", so that the tables exist and we can see that --noflush leaves
them alone; after unloading, the save output must equal the one before,
byte for byte.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import shutil
import subprocess
from typing import Iterator

import pytest

from metaproxy.config import load
from metaproxy.config.model import Config
from metaproxy.firewall import render
from tests.preconditions import unmet

SYSPATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
REPO = pathlib.Path(__file__).resolve().parents[2]
TOOLS = ["ip", "nft", "iptables-legacy-restore", "iptables-legacy-save", "iptables-nft-restore",
         "iptables-nft-save", "ip6tables-legacy-restore", "ip6tables-legacy-save", "ip6tables-nft-restore",
         "ip6tables-nft-save"]
# A user that exists on every Debian system, standing in for debian-tor.
EXEMPT = "daemon"
_names = itertools.count()

# family -> (backend, the two restore tools)
IPTABLES = {4: ("iptables", ("iptables-legacy", "iptables-nft")),
            6: ("ip6tables", ("ip6tables-legacy", "ip6tables-nft"))}
SOMEONE_ELSES = """\
*filter
:SOMEONE - [0:0]
-A OUTPUT -p udp -m udp --dport 9 -j ACCEPT
-A SOMEONE -j RETURN
COMMIT
*nat
-A OUTPUT -p tcp -m tcp --dport 9 -j RETURN
COMMIT
*mangle
-A OUTPUT -p tcp -m tcp --dport 9 -j RETURN
-A PREROUTING -p tcp -m tcp --dport 9 -j RETURN
COMMIT
"""
SOMEONE_ELSES_NFT = """\
table inet someone {
	chain out {
		type filter hook output priority 10; policy accept;
		udp dport 9 accept
	}
}
"""


def _precondition() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "the firewall load tests need root (network namespaces)"
    elif missing := [t for t in TOOLS if shutil.which(t, path=SYSPATH) is None]:
        reason = f"missing programs: {', '.join(missing)} (apt-get install iptables nftables iproute2)"
    unmet(reason)


def run(argv: list[str], *, stdin: str = "", check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": SYSPATH, "LANG": "C.UTF-8"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


class Netns:
    """A namespace of our own; ``run`` executes inside it."""

    def __init__(self) -> None:
        self.name = f"mpfw{os.getpid()}l{next(_names)}"

    def __enter__(self) -> "Netns":
        run(["ip", "netns", "add", self.name])
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        run(["ip", "netns", "del", self.name], check=False)

    def run(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.name, *argv], **kwargs)  # type: ignore[arg-type]

    def save(self, tool: str) -> str:
        """``iptables-save`` without its timestamp comments, or ``nft list ruleset``."""
        if tool == "nft":
            return self.run(["nft", "list", "ruleset"]).stdout
        lines = self.run([f"{tool}-save"]).stdout.splitlines()
        return "\n".join(line for line in lines if not line.startswith("#"))


def by_table(saved: str) -> dict[str, list[str]]:
    """iptables-save output as table -> its lines."""
    tables: dict[str, list[str]] = {}
    current: list[str] = []
    for line in saved.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif line != "COMMIT":
            current.append(line)
    return tables


@pytest.fixture
def netns() -> Iterator[Netns]:
    _precondition()
    with Netns() as ns:
        yield ns


def lab_config(tmp_path: pathlib.Path, mode: str) -> Config:
    """Every feature the rules have: IPv4 and IPv6 upstreams, a resolver, a local upstream."""
    path = tmp_path / f"{mode}.conf"
    path.write_text(f"""
[daemon]
user = nobody
mode = {mode}
[upstreams]
    [[tor]]
    type = socks5
    address = 127.0.0.1:9050
    [[lan]]
    type = socks5
    address = 192.0.2.2:1080
    [[lan_v6]]
    type = http
    address = [2001:db8:1::2]:3128
[routes]
* = tor
"1-1000" = lan
"1001-2000" = lan_v6
[firewall]
dns = 192.0.2.53:53
exempt_users = {EXEMPT}
""")
    return load(str(path))


CASES = [(mode, strict, family, tool)
         for mode in ("redirect", "tproxy") for strict in (False, True)
         for family in (4, 6) for tool in IPTABLES[family][1]]


@pytest.mark.parametrize(("mode", "strict", "family", "tool"), CASES,
                         ids=[f"{m}-{'strict' if s else 'plain'}-{t}" for m, s, _, t in CASES])
def test_iptables_rules_load_and_unload_leave_the_tables_as_before(
        netns: Netns, tmp_path: pathlib.Path, mode: str, strict: bool, family: int, tool: str) -> None:
    """iptables-restore --noflush loads the ruleset next to other rules; the removal restores the state."""
    backend = IPTABLES[family][0]
    config = lab_config(tmp_path, mode)
    netns.run([f"{tool}-restore", "--noflush"], stdin=SOMEONE_ELSES)
    before = netns.save(tool)

    netns.run([f"{tool}-restore", "--noflush"], stdin=render(config, backend, strict=strict))
    tables = by_table(netns.save(tool))
    assert "-A OUTPUT -p udp -m udp --dport 9 -j ACCEPT" in tables["filter"], "--noflush must keep other rules"
    expected = {"filter": strict, "mangle": mode == "tproxy", "nat": mode == "redirect" or (strict and family == 4)}
    assert {t: ":METAPROXY - [0:0]" in tables.get(t, []) for t in expected} == expected
    for table, hooked in expected.items():
        if hooked:  # our jump is the first rule of the built-in chain, before someone else's
            assert [r for r in tables[table] if r.startswith("-A OUTPUT ")][0] == "-A OUTPUT -j METAPROXY"
    if mode == "tproxy":
        assert [r for r in tables["mangle"] if r.startswith("-A PREROUTING ")][0] == \
            "-A PREROUTING -j METAPROXY_TPROXY"

    netns.run([f"{tool}-restore", "--noflush"], stdin=render(config, backend, strict=strict, unload=True))
    assert netns.save(tool) == before


@pytest.mark.parametrize("tool", ["iptables-legacy", "iptables-nft"])
def test_iptables_removal_when_not_loaded_fails_and_changes_nothing(netns: Netns, tmp_path: pathlib.Path,
                                                                    tool: str) -> None:
    config = lab_config(tmp_path, "redirect")
    netns.run([f"{tool}-restore", "--noflush"], stdin=SOMEONE_ELSES)
    before = netns.save(tool)
    proc = netns.run([f"{tool}-restore", "--noflush"], stdin=render(config, "iptables", strict=True, unload=True),
                     check=False)
    assert proc.returncode != 0
    assert netns.save(tool) == before


@pytest.mark.parametrize("tool", ["iptables-legacy", "iptables-nft"])
def test_iptables_reload_flushes_our_chains_and_adds_only_a_jump(netns: Netns, tmp_path: pathlib.Path,
                                                                  tool: str) -> None:
    """Loading twice (as the header warns) duplicates the jump, never the chain's rules."""
    config = lab_config(tmp_path, "redirect")
    text = render(config, "iptables", strict=True)
    netns.run([f"{tool}-restore", "--noflush"], stdin=text)
    once = netns.save(tool)
    netns.run([f"{tool}-restore", "--noflush"], stdin=text)
    twice = netns.save(tool)
    assert [line for line in twice.splitlines() if line.startswith("-A METAPROXY")] == \
        [line for line in once.splitlines() if line.startswith("-A METAPROXY")]
    assert twice.count("-A OUTPUT -j METAPROXY") == 2 * once.count("-A OUTPUT -j METAPROXY")


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
@pytest.mark.parametrize("strict", [False, True])
def test_nft_rules_load_idempotently_and_unload_leave_the_ruleset_as_before(
        netns: Netns, tmp_path: pathlib.Path, mode: str, strict: bool) -> None:
    config = lab_config(tmp_path, mode)
    netns.run(["nft", "-f", "-"], stdin=SOMEONE_ELSES_NFT)
    before = netns.save("nft")

    text = render(config, "nftables", strict=strict)
    netns.run(["nft", "-f", "-"], stdin=text)
    once = netns.save("nft")
    assert "table inet metaproxy" in once and "table inet someone" in once
    assert ("reject" in once) is strict
    netns.run(["nft", "-f", "-"], stdin=text)
    assert netns.save("nft") == once, "loading again must replace the table, not add to it"

    unload = render(config, "nftables", strict=strict, unload=True)
    netns.run(["nft", "-f", "-"], stdin=unload)
    assert netns.save("nft") == before
    netns.run(["nft", "-f", "-"], stdin=unload)  # removal is idempotent too
    assert netns.save("nft") == before


def test_nft_documented_removal_command_works(netns: Netns, tmp_path: pathlib.Path) -> None:
    """The header says "nft delete table inet metaproxy"; that must do it."""
    config = lab_config(tmp_path, "redirect")
    before = netns.save("nft")
    text = render(config, "nftables", strict=True)
    assert "#   nft delete table inet metaproxy\n" in text
    netns.run(["nft", "-f", "-"], stdin=text)
    netns.run(["nft", "delete", "table", "inet", "metaproxy"])
    assert netns.save("nft") == before


@pytest.mark.parametrize("backend", ["iptables", "ip6tables", "nftables"])
def test_tproxy_policy_routing_commands_in_the_header_run_and_undo(netns: Netns, tmp_path: pathlib.Path,
                                                                   backend: str) -> None:
    """The ``ip rule``/``ip route`` lines printed as comments are real commands."""
    text = render(lab_config(tmp_path, "tproxy"), backend, strict=False)
    lines = [line[len("#   "):] for line in text.splitlines() if line.startswith("#   ip -")]
    add = [line.split() for line in lines if " add " in line]
    undo = [line.split() for line in lines if " del " in line]
    assert add and len(add) == len(undo)
    before = [netns.run(["ip", f"-{f}", what, "show", *(["table", "all"] if what == "route" else [])]).stdout
              for f in (4, 6) for what in ("rule", "route")]
    for argv in add:
        netns.run(argv)
    assert "fwmark 0x8675 lookup 8675" in netns.run(["ip", add[0][1], "rule", "show"]).stdout
    for argv in undo:
        netns.run(argv)
    after = [netns.run(["ip", f"-{f}", what, "show", *(["table", "all"] if what == "route" else [])]).stdout
             for f in (4, 6) for what in ("rule", "route")]
    assert after == before


def test_cli_prints_what_render_returns(tmp_path: pathlib.Path) -> None:
    """``--print-rules`` is this module's render(); the CLI adds nothing and loses nothing."""
    _precondition()
    config = lab_config(tmp_path, "redirect")
    for backend in ("iptables", "ip6tables", "nftables"):
        proc = subprocess.run(["/usr/bin/python3", "-m", "metaproxy", "-c", config.source, "--print-rules", backend,
                               "--strict"], capture_output=True, text=True, timeout=30, cwd=REPO,
                              env={"PATH": SYSPATH, "LANG": "C.UTF-8", "PYTHONPATH": str(REPO),
                                   "PYTHONDONTWRITEBYTECODE": "1"})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == render(config, backend, strict=True)
