"""The Debian package, for real: built, linted, installed into a booted Debian 12 and 13.

1. tools/build-deb.sh builds the .deb from this tree (unit tests are the unit
   tier's job, so the build here is nocheck); lintian must print nothing.
2. The unit files rate 2.0 or lower in ``systemd-analyze security``.
3. A cached debootstrapped bookworm, then trixie (tests/package/rootfs.py),
   boots under systemd-nspawn with a private network. Inside each, the same
   chain: apt-get install the .deb;
   the service runs as _metaproxy without capabilities; REDIRECT rules (the
   service user excluded) send curl's connection to a web server on an RFC 5737
   address through the daemon and a real SOCKS5 server (microsocks); the
   journal logs the connection but not its destination; reload takes a new
   upstream without a restart; stop exits 0; purge leaves the user behind.

The steps share one container per suite and run in file order (pytest runs
every step on bookworm, then every step on trixie). Everything the test starts
is stopped by PID in the fixtures' finally blocks. Not root or a tool missing:
FAIL, unless METAPROXY_ALLOW_SKIP=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.package import rootfs
from tests.package.container import Container
from tests.preconditions import require_root_and_tools

ROOT = Path(__file__).resolve().parents[2]
SYSPATH = rootfs.SYSPATH
UNITS = ("metaproxy.service", "metaproxy-firewall.service")  # debian/subgraph-metaproxy.<unit>
MAX_EXPOSURE = 2.0
WEB_IP = "198.51.100.2"        # RFC 5737, on the container's lo
SOCKS = "127.0.0.1:1080"       # microsocks, as the unprivileged user nobody
TOKEN = "metaproxy-package-test-7d1f"
TOOLS = ["systemd-nspawn", "nsenter", "debootstrap", "mount", "dpkg-buildpackage", "dh", "pybuild",
         "lintian", "mandoc", "systemd-analyze", "setpriv"]


def _precondition() -> None:
    require_root_and_tools(TOOLS, "the package test needs root (debootstrap, systemd-nspawn, mount)")


# ---- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def debs() -> Iterator[Path]:
    """The built package: METAPROXY_TEST_DEB (a .deb path) or a fresh nocheck build."""
    _precondition()
    given = os.environ.get("METAPROXY_TEST_DEB")
    if given:
        path = Path(given).resolve()
        if not path.is_file():
            pytest.fail(f"METAPROXY_TEST_DEB={given} is not a file", pytrace=False)
        yield path.parent
        return
    out = Path(tempfile.mkdtemp(prefix="metaproxy-debs."))
    try:
        started = time.monotonic()
        result = subprocess.run([str(ROOT / "tools/build-deb.sh"), "--nocheck", "--no-lintian", "-o", str(out)],
                                capture_output=True, text=True, timeout=900, env={"PATH": SYSPATH})
        if result.returncode != 0:
            pytest.fail(f"tools/build-deb.sh failed ({result.returncode}):\n"
                        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}", pytrace=False)
        print(f"package built in {time.monotonic() - started:.1f}s")
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def deb(debs: Path) -> Path:
    found = sorted(debs.glob("subgraph-metaproxy_*.deb"))
    if len(found) != 1:
        pytest.fail(f"expected one subgraph-metaproxy_*.deb in {debs}, found {found}", pytrace=False)
    return found[0]


@pytest.fixture(scope="module", params=rootfs.SUITES)
def box(request: pytest.FixtureRequest, deb: Path) -> Iterator[Container]:
    """A booted Debian (bookworm, then trixie) with the .deb copied into /root, torn down whatever happens."""
    suite: str = request.param
    started = time.monotonic()
    try:
        cache = rootfs.ensure_cache(suite)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"cannot make the {suite} root: {e}", pytrace=False)
    print(f"{suite} root ready in {time.monotonic() - started:.1f}s ({cache})")
    with rootfs.scratch_root(cache) as root:
        shutil.copy2(deb, root / "root" / deb.name)
        container = Container(root, root.parent / "console.log", name=f"metaproxy-{suite}")
        try:
            booted = time.monotonic()
            container.boot()
            print(f"container booted in {time.monotonic() - booted:.1f}s")
            yield container
        finally:
            container.stop()


# ---- helpers --------------------------------------------------------------------------

def exposure(analyze_output: str, unit: str) -> float:
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", analyze_output)
    if match is None:
        pytest.fail(f"no exposure level in systemd-analyze output:\n{analyze_output[-2000:]}", pytrace=False)
    return float(match.group(1))


def journal(box: Container, unit: str) -> list[dict[str, object]]:
    out = box.run(["journalctl", "-u", unit, "-o", "json", "--no-pager"]).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def message(entry: dict[str, object]) -> str:
    value = entry.get("MESSAGE", "")
    if isinstance(value, list):  # journalctl spells non-UTF-8 messages as byte lists
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def wait_for_journal(box: Container, unit: str, pattern: str, *, after: int = 0,
                     timeout: float = 15.0) -> list[dict[str, object]]:
    """Entries (from index ``after``) once one MESSAGE matches ``pattern``."""
    deadline = time.monotonic() + timeout
    entries: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        entries = journal(box, unit)
        if any(re.search(pattern, message(e)) for e in entries[after:]):
            return entries
        time.sleep(0.2)
    lines = "\n".join(message(e) for e in entries[after:][-30:])
    pytest.fail(f"no {unit} journal line matching {pattern!r} within {timeout}s; the last ones:\n{lines}",
                pytrace=False)


def service(box: Container, *props: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", "metaproxy.service", *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def config_text(upstream: str) -> str:
    # log_connections: the per-connection lines the steps wait for (off by default).
    return (f"[daemon]\nport = 8675\nlog_connections = yes\n\n[upstreams]\n    [[{upstream}]]\n    type = socks5\n"
            f"    address = {SOCKS}\n\n[routes]\n* = {upstream}\n")



def fetch(box: Container) -> str:
    return box.run(["curl", "--silent", "--show-error", "--max-time", "10",
                    f"http://{WEB_IP}/token.html"], timeout=30).stdout


# ---- the package, outside a container ---------------------------------------------------

def test_lintian_pedantic_prints_nothing(debs: Path) -> None:
    """lintian --fail-on error,warning --pedantic on the .changes and .dsc prints nothing (as nobody)."""
    lint = Path(tempfile.mkdtemp(prefix="metaproxy-lintian."))
    try:
        lint.chmod(0o755)
        for f in debs.glob("subgraph-metaproxy_*"):
            shutil.copy(f, lint / f.name)
            (lint / f.name).chmod(0o644)
        changes = sorted(p.name for p in lint.glob("*.changes")) + sorted(p.name for p in lint.glob("*.dsc"))
        assert len(changes) == 2, f"expected a .changes and a .dsc next to the .deb in {debs}, found {changes}"
        result = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
             "lintian", "--fail-on", "error,warning", "--pedantic", *changes],
            cwd=lint, capture_output=True, text=True, timeout=600,
            env={"PATH": SYSPATH, "HOME": str(lint), "LANG": "C.UTF-8"})
        report = (result.stdout + result.stderr).strip()
        assert result.returncode == 0 and not report, f"lintian ({result.returncode}):\n{report}"
    finally:
        shutil.rmtree(lint, ignore_errors=True)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_file_exposure_is_at_most_2(unit: str) -> None:
    """systemd-analyze security --offline=true rates the unit in debian/ 2.0 or lower."""
    _precondition()
    source = ROOT / "debian" / f"subgraph-metaproxy.{unit}"
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(source)],
                            capture_output=True, text=True, timeout=60, env={"PATH": SYSPATH})
    level = exposure(result.stdout + result.stderr, source.name)
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}:\n{result.stdout}"


def test_man_pages_pass_mandoc_lint() -> None:
    """mandoc -Tlint -W warning finds nothing in either page."""
    _precondition()
    pages = [str(ROOT / "man/subgraph_metaproxy.8"), str(ROOT / "man/subgraph_metaproxy.conf.5")]
    result = subprocess.run(["mandoc", "-Tlint", "-W", "warning", *pages], capture_output=True, text=True,
                            timeout=60, env={"PATH": SYSPATH})
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


# ---- inside a booted Debian 12, then 13 ---------------------------------------------------

def test_install_creates_the_user_and_starts_the_service(box: Container, deb: Path) -> None:
    """apt-get install ./the.deb: sysusers creates _metaproxy, postinst enables and starts the unit."""
    box.run(["sh", "-c", f"cd /root && apt-get install -y -q --no-install-recommends ./{deb.name}"],
            timeout=300)
    user = box.run(["getent", "passwd", "_metaproxy"]).stdout.split(":")
    assert user[0] == "_metaproxy" and user[6].strip() == "/usr/sbin/nologin", user
    assert box.run(["systemctl", "is-enabled", "metaproxy"], check=False).stdout.strip() == "enabled"
    state = box.run(["systemctl", "is-active", "metaproxy"], check=False).stdout.strip()
    if state != "active":
        logs = box.run(["journalctl", "-u", "metaproxy", "--no-pager", "-n", "60"], check=False).stdout
        pytest.fail(f"metaproxy.service is {state!r} after install; its journal:\n{logs}", pytrace=False)
    conffiles = box.run(["dpkg-query", "--showformat=${Conffiles}", "--show", "subgraph-metaproxy"]).stdout
    assert "/etc/subgraph_metaproxy.conf" in conffiles


def test_installed_units_verify_silently_and_rate_at_most_2(box: Container) -> None:
    """systemd-analyze verify prints nothing; security rates each loaded unit 2.0 or lower."""
    for unit in UNITS:
        verify = box.run(["systemd-analyze", "verify", unit], check=False)
        assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), \
            f"systemd-analyze verify {unit} ({verify.returncode}):\n{verify.stdout}{verify.stderr}"
        security = box.run(["systemd-analyze", "security", "--no-pager", unit], check=False)
        level = exposure(security.stdout + security.stderr, unit)
        assert level <= MAX_EXPOSURE, f"{unit}: exposure {level}:\n{security.stdout}"
    # The firewall unit changes the host's firewall: installed, never enabled by the package.
    assert box.run(["systemctl", "is-enabled", "metaproxy-firewall"], check=False).stdout.strip() == "disabled"


def test_man_pages_and_launcher_are_installed(box: Container) -> None:
    """man finds both pages; the launcher runs Debian's python3 in isolated mode."""
    for page in (["8", "subgraph_metaproxy"], ["5", "subgraph_metaproxy.conf"]):
        box.run(["man", "-w", *page])
    head = box.run(["head", "-n1", "/usr/sbin/subgraph_metaproxy"]).stdout.strip()
    assert head == "#!/usr/bin/python3 -I", head
    version = box.run(["/usr/sbin/subgraph_metaproxy", "--version"]).stdout
    assert version.startswith("subgraph_metaproxy "), version


def man_examples(page: Path, starts: str) -> list[str]:
    """The literal blocks of a page's EXAMPLES whose text starts with ``starts``."""
    text = page.read_text(encoding="utf-8")
    body = text.split(".Sh EXAMPLES", 1)[1].split("\n.Sh ", 1)[0]
    blocks = re.findall(r"^\.Bd -literal[^\n]*\n(.*?)^\.Ed$", body, re.M | re.S)
    return [b.replace("\\-", "-") for b in blocks if b.startswith(starts)]


def test_the_man_page_rule_examples_load(box: Container) -> None:
    """The iptables and nftables examples of subgraph_metaproxy(8) load (in a throwaway netns)."""
    page = ROOT / "man/subgraph_metaproxy.8"
    iptables = man_examples(page, "iptables ")
    nft = man_examples(page, "table inet ")
    assert len(iptables) == 1 and len(nft) == 1, "expected one iptables and one nftables example"
    # The examples exempt a local Tor's user, as Debian's tor package creates it.
    box.run(["sh", "-c", "getent passwd debian-tor || useradd --system --no-create-home debian-tor"])
    box.run(["unshare", "--net", "sh", "-ec", iptables[0]])
    box.write("/root/example.nft", nft[0])
    box.run(["unshare", "--net", "nft", "-f", "/root/example.nft"])


def test_service_runs_as_metaproxy_without_capabilities(box: Container) -> None:
    """The serving process: every uid/gid _metaproxy, no capabilities, no-new-privs, seccomp on."""
    box.run(["systemctl", "stop", "metaproxy"])
    box.write("/etc/subgraph_metaproxy.conf", config_text("first"))
    box.run(["systemctl", "start", "metaproxy"], timeout=60)
    assert box.run(["systemctl", "is-active", "metaproxy"], check=False).stdout.strip() == "active"
    pid = service(box, "MainPID")["MainPID"]
    status = dict(line.split(":", 1) for line in
                  box.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines() if ":" in line)
    uid = box.run(["id", "-u", "_metaproxy"]).stdout.strip()
    gid = box.run(["id", "-g", "_metaproxy"]).stdout.strip()
    assert status["Uid"].split() == [uid] * 4, status["Uid"]
    assert status["Gid"].split() == [gid] * 4, status["Gid"]
    assert status["Groups"].split() == [], status["Groups"]
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, f"{caps} = {status[caps].strip()}"
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"


def test_redirected_connection_is_relayed_and_logged_without_its_destination(box: Container) -> None:
    """curl to 198.51.100.2:80 is REDIRECTed, relayed through microsocks; the journal hides the address."""
    box.run(["ip", "address", "add", f"{WEB_IP}/32", "dev", "lo"])
    box.run(["mkdir", "-p", "/srv/www"])
    box.write("/srv/www/token.html", TOKEN + "\n")
    box.run(["systemd-run", "--unit=test-web", "--", "/usr/bin/python3", "-m", "http.server",
             "--bind", WEB_IP, "--directory", "/srv/www", "80"])
    host, port = SOCKS.split(":")
    box.run(["systemd-run", "--unit=test-socks", "--property=User=nobody", "--",
             "/usr/bin/microsocks", "-i", host, "-p", port])
    # The man page's chain: the service user and the SOCKS server (as Tor's user
    # would be) are left alone, and so are local networks; the rest is redirected.
    box.sh("""
        iptables -t nat -N METAPROXY
        iptables -t nat -A METAPROXY -m owner --uid-owner _metaproxy -j RETURN
        iptables -t nat -A METAPROXY -m owner --uid-owner nobody -j RETURN
        iptables -t nat -A METAPROXY -d 127.0.0.0/8 -j RETURN
        iptables -t nat -A METAPROXY -p tcp -j REDIRECT --to-ports 8675
        iptables -t nat -A OUTPUT -p tcp -j METAPROXY
    """)
    for unit in ("test-web", "test-socks"):
        box.sh(f"for i in $(seq 50); do systemctl is-active --quiet {unit} && exit 0; sleep 0.1; done; exit 1")
    box.sh("for i in $(seq 50); do [ -n \"$(ss -Htln 'sport = :80')\" ] && exit 0; sleep 0.1; done; exit 1")
    before = len(journal(box, "metaproxy"))

    assert fetch(box).strip() == TOKEN

    entries = wait_for_journal(box, "metaproxy", r"cid=\d+ close", after=before)
    ours = entries[before:]
    opened = [e for e in ours if re.search(r"cid=\d+ open via first", message(e))]
    assert opened, "no 'open via first' line:\n" + "\n".join(message(e) for e in ours)
    assert opened[0].get("METAPROXY_UPSTREAM") == "first" and opened[0].get("METAPROXY_CID")
    assert "METAPROXY_DESTINATION" not in opened[0]
    leaked = [json.dumps(e) for e in ours if WEB_IP in json.dumps(e)]
    assert not leaked, "the destination address appears in the journal:\n" + "\n".join(leaked)
    socks = box.run(["journalctl", "-u", "test-socks", "--no-pager", "-o", "cat"]).stdout
    assert f"connected to {WEB_IP}:80" in socks, f"microsocks did not carry the connection:\n{socks}"


def test_reload_takes_a_new_upstream_without_a_restart(box: Container) -> None:
    """systemctl reload (SIGHUP): the same process routes the next connection via the renamed upstream."""
    pid = service(box, "MainPID")["MainPID"]
    box.write("/etc/subgraph_metaproxy.conf", config_text("second"))
    before = len(journal(box, "metaproxy"))
    box.run(["systemctl", "reload", "metaproxy"], timeout=60)
    wait_for_journal(box, "metaproxy", r"reloaded routes and upstreams", after=before)
    assert service(box, "MainPID")["MainPID"] == pid, "reload restarted the daemon"
    assert fetch(box).strip() == TOKEN
    entries = wait_for_journal(box, "metaproxy", r"cid=\d+ open via second", after=before)
    assert not [e for e in entries[before:] if WEB_IP in json.dumps(e)]


def test_watchdog_pings_keep_arriving_under_the_seccomp_filter(box: Container) -> None:
    """With WatchdogSec=2s (a runtime drop-in), pings arrive after READY and nothing restarts."""
    dropin = "/run/systemd/system/metaproxy.service.d"
    box.run(["mkdir", "-p", dropin])
    box.write(f"{dropin}/watchdog.conf", "[Service]\nWatchdogSec=2s\n")
    try:
        box.run(["systemctl", "daemon-reload"])
        box.run(["systemctl", "restart", "metaproxy"], timeout=60)
        first = service(box, "WatchdogTimestampMonotonic", "NRestarts")
        time.sleep(3.0)  # three intervals of the daemon's 1 s ping
        later = service(box, "WatchdogTimestampMonotonic", "NRestarts", "ActiveState")
        assert later["ActiveState"] == "active" and later["NRestarts"] == first["NRestarts"], later
        assert int(later["WatchdogTimestampMonotonic"]) > int(first["WatchdogTimestampMonotonic"]), \
            f"no watchdog ping in 3 s: {first} -> {later}"
    finally:
        box.run(["rm", "-rf", dropin])
        box.run(["systemctl", "daemon-reload"])


def test_tproxy_mode_starts_with_the_documented_capability_drop_in(box: Container) -> None:
    """mode = tproxy fails (71) under the stock bounding set, and runs with conf(5)'s drop-in."""
    page = (ROOT / "man/subgraph_metaproxy.conf.5").read_text(encoding="utf-8")
    blocks = re.findall(r"^\.Bd -literal[^\n]*\n(\[Service\]\nCapabilityBoundingSet=.*?)^\.Ed$", page, re.M | re.S)
    assert len(blocks) == 1, "subgraph_metaproxy.conf(5) should show the TPROXY bounding-set drop-in once"
    dropin = "/run/systemd/system/metaproxy.service.d"
    box.write("/etc/subgraph_metaproxy.conf", config_text("second").replace("[daemon]\n", "[daemon]\nmode = tproxy\n"))
    try:
        assert box.run(["systemctl", "restart", "metaproxy"], check=False, timeout=60).returncode != 0
        assert service(box, "ExecMainStatus")["ExecMainStatus"] == "71"
        box.run(["mkdir", "-p", dropin])
        box.write(f"{dropin}/tproxy.conf", blocks[0])
        box.run(["systemctl", "daemon-reload"])
        box.run(["systemctl", "reset-failed", "metaproxy"], check=False)
        box.run(["systemctl", "restart", "metaproxy"], timeout=60)
        pid = service(box, "MainPID")["MainPID"]
        status = box.run(["cat", f"/proc/{pid}/status"]).stdout
        assert re.search(r"^CapBnd:\s+0+$", status, re.M), "the daemon kept a capability in tproxy mode"
    finally:
        box.run(["rm", "-rf", dropin])
        box.run(["systemctl", "daemon-reload"])
        box.write("/etc/subgraph_metaproxy.conf", config_text("second"))
        box.run(["systemctl", "reset-failed", "metaproxy"], check=False)
        box.run(["systemctl", "restart", "metaproxy"], timeout=60)


def test_sigkill_is_survived_through_restart_on_failure(box: Container) -> None:
    """After SIGKILL, Restart=on-failure brings a new daemon that relays again."""
    before = service(box, "MainPID", "NRestarts")
    box.run(["systemctl", "kill", "--signal=KILL", "metaproxy"])
    deadline = time.monotonic() + 20  # RestartSec=2s, plus ExecStartPre's config test
    now = before
    while time.monotonic() < deadline:
        now = service(box, "MainPID", "NRestarts", "ActiveState")
        if now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"]):
            break
        time.sleep(0.2)
    assert now.get("ActiveState") == "active" and now["MainPID"] not in ("0", before["MainPID"]), now
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1, now
    assert fetch(box).strip() == TOKEN


def test_stop_drains_and_exits_0(box: Container) -> None:
    """systemctl stop (SIGTERM): the daemon logs that it stopped and exits with status 0."""
    before = len(journal(box, "metaproxy"))
    box.run(["systemctl", "stop", "metaproxy"], timeout=90)
    props = service(box, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props
    wait_for_journal(box, "metaproxy", r"^stopped", after=before)


TOR_SOCKET_GROUP = "/run/tor/socks-group"  # a GroupWritable SocksPort beside Debian's WorldWritable one
UNMAPPED_VIRTUAL = "10.192.0.5"            # in Tor's VirtualAddrNetworkIPv4, mapped to nothing


def torrc_lines_from_the_man_page() -> str:
    """The torrc lines subgraph_metaproxy.conf(5) ONION SERVICES tells Debian's tor users to add."""
    page = (ROOT / "man/subgraph_metaproxy.conf.5").read_text(encoding="utf-8")
    body = page.split(".Sh ONION SERVICES", 1)[1].split("\n.Sh ", 1)[0]
    blocks = re.findall(r"^\.Bd -literal[^\n]*\n(SocksPort .*?)^\.Ed$", body, re.M | re.S)
    assert len(blocks) == 1, "subgraph_metaproxy.conf(5) ONION SERVICES should show the torrc lines once"
    return blocks[0].replace("\\-", "-")


def tor_config_text(address: str, groups: str = "") -> str:
    return (f"[daemon]\nport = 8675\n{f'groups = {groups}' if groups else ''}\n\n[upstreams]\n    [[tor]]\n"
            f"    type = socks5\n    address = {address}\n\n[routes]\n* = tor\n\n"
            "[firewall]\ndns = 127.0.0.1:5353\nexempt_users = debian-tor\n")


def _refused_by_tor(box: Container, address: str, groups: str = "") -> str:
    """Start the service on ``address``; a redirected curl to an unmapped virtual address must be
    refused by tor itself (the socket reached, the SOCKS5 handshake done). Returns the refusal line."""
    box.write("/etc/subgraph_metaproxy.conf", tor_config_text(address, groups))
    box.run(["systemctl", "restart", "metaproxy"], timeout=60)
    before = len(journal(box, "metaproxy"))
    curl = box.run(["curl", "--silent", "--show-error", "--max-time", "20", f"http://{UNMAPPED_VIRTUAL}/"],
                   check=False, timeout=40)
    assert curl.returncode != 0, f"curl of an unmapped virtual address succeeded: {curl.stdout}"
    entries = wait_for_journal(box, "metaproxy", r"refused CONNECT: ", after=before, timeout=20)
    lines = [message(e) for e in entries[before:]]
    refusal = next(line for line in lines if "refused CONNECT: " in line)
    assert not [line for line in lines if "nreachable" in line or "Permission denied" in line], lines
    assert not [json.dumps(e) for e in entries[before:] if UNMAPPED_VIRTUAL in json.dumps(e)], \
        "the virtual address appears in the journal at the default level"
    return refusal


def test_debian_tor_out_of_the_box_the_service_reaches_its_unix_socket(box: Container) -> None:
    """Debian's tor, its shipped defaults plus conf(5)'s torrc lines; the package's service with
    upstream unix:/run/tor/socks; the package's own --print-rules. The container has no network,
    so tor never bootstraps: a redirected curl to an unmapped address of Tor's virtual range is
    refused by tor at once ("Missing mapping for virtual address"), which the daemon logs as
    tor's refusal -- the socket reached and the handshake done, not "unreachable" or
    "Permission denied". Then a GroupWritable SocksPort, reached with [daemon] groups = debian-tor."""
    started = time.monotonic()
    defaults = box.run(["cat", "/usr/share/tor/tor-service-defaults-torrc"]).stdout
    assert "SocksPort unix:/run/tor/socks WorldWritable" in defaults, defaults
    # Tor wants a GroupWritable socket's directory private to its group unless told RelaxDirModeCheck
    # (Debian's /run/tor is 02755, as for its own GroupWritable ControlSocket line).
    extra = torrc_lines_from_the_man_page() + \
        f"SocksPort unix:{TOR_SOCKET_GROUP} GroupWritable RelaxDirModeCheck ExtendedErrors\n"
    box.run(["sh", "-c", 'cat >> /etc/tor/torrc'], input=extra)
    box.run(["systemctl", "start", "tor@default"], timeout=120)
    box.sh(f"for i in $(seq 100); do [ -S /run/tor/socks ] && [ -S {TOR_SOCKET_GROUP} ] && exit 0; sleep 0.1; done;"
           " exit 1")
    layout = box.run(["stat", "-c", "%a %U %G %n", "/run/tor", "/run/tor/socks", TOR_SOCKET_GROUP]).stdout.split("\n")
    assert layout[0].startswith("2755 debian-tor debian-tor"), layout
    # The package's own rules (not strict), in place of the hand-made chain of the earlier steps.
    box.sh("""
        iptables -t nat -D OUTPUT -p tcp -j METAPROXY 2>/dev/null || true
        iptables -t nat -F METAPROXY 2>/dev/null || true
        iptables -t nat -X METAPROXY 2>/dev/null || true
        ip route add 10.192.0.0/10 dev lo  # a real host's default route covers Tor's virtual range
    """)
    box.write("/etc/subgraph_metaproxy.conf", tor_config_text("unix:/run/tor/socks"))
    rules = box.run(["/usr/sbin/subgraph_metaproxy", "--print-rules", "iptables"]).stdout
    assert "-d 10.192.0.0/10 -p tcp -j REDIRECT --to-ports 8675" in rules
    box.run(["iptables-restore", "--noflush"], input=rules)
    try:
        world = _refused_by_tor(box, "unix:/run/tor/socks")
        print(f"WorldWritable {'/run/tor/socks'}: {world}")
        tor_log = box.run(["journalctl", "-u", "tor@default", "--no-pager", "-o", "cat"]).stdout
        assert "Missing mapping for virtual address" in tor_log or "private address" in tor_log, tor_log[-3000:]
        gid = box.run(["getent", "group", "debian-tor"]).stdout.split(":")[2]
        group = _refused_by_tor(box, f"unix:{TOR_SOCKET_GROUP}", groups="debian-tor")
        pid = service(box, "MainPID")["MainPID"]
        kept = box.run(["sh", "-c", f"grep ^Groups: /proc/{pid}/status"]).stdout.split()[1:]
        assert kept == [gid], f"the service kept the groups {kept}, expected debian-tor's {gid}"
        print(f"GroupWritable {TOR_SOCKET_GROUP} with groups = debian-tor: {group}")
    finally:
        box.run(["iptables-restore", "--noflush"], check=False,
                input=box.run(["/usr/sbin/subgraph_metaproxy", "--print-rules", "iptables", "--unload"],
                              check=False).stdout)
        box.run(["systemctl", "stop", "metaproxy", "tor@default"], check=False, timeout=90)
    print(f"Debian's tor step: {time.monotonic() - started:.1f}s")


def test_purge_removes_the_package_and_keeps_the_user(box: Container) -> None:
    """apt-get purge: program, conffile, unit and enablement go; the system user stays (Debian practice)."""
    box.run(["apt-get", "purge", "-y", "-q", "subgraph-metaproxy"], timeout=300)
    gone = box.run(["sh", "-c", "dpkg-query -W -f='${Status}' subgraph-metaproxy 2>&1 || true"]).stdout
    assert "ok installed" not in gone and "config-files" not in gone, gone
    for path in ("/usr/sbin/subgraph_metaproxy", "/etc/subgraph_metaproxy.conf",
                 "/lib/systemd/system/metaproxy.service", "/lib/systemd/system/metaproxy-firewall.service",
                 "/etc/systemd/system/multi-user.target.wants/metaproxy.service"):
        assert box.run(["test", "!", "-e", path], check=False).returncode == 0, f"{path} is left after purge"
    assert box.run(["getent", "passwd", "_metaproxy"], check=False).returncode == 0
