"""Generated configs fed to ``-t`` (the loader behind metaproxy.cli): never a traceback.

Hypothesis writes configobj text and legacy JSON, valid and broken, plus
random bytes and syntax soup, to a file and runs the real command line
(``metaproxy.cli.main``) on it, in-process for speed and through
``/usr/bin/python3 -m metaproxy`` for a few. Every run must end one of two ways:

* exit 0, stdout starting "<file>: configuration OK" and the relay table
  (for a generated valid config: every routed port listed);
* exit 78 (EX_CONFIG), with one or more problem lines on stderr, each
  starting with the file name, and nothing that looks like a traceback.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaproxy import cli
from metaproxy.errors import EX_CONFIG

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("METAPROXY_FUZZ_EXAMPLES", "60")) * 3
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
ASCII_WORD = st.lists(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_-."), min_size=1,
                      max_size=24).map("".join)
# A user name as the firewall rules accept it: no leading '-' or '.'.
USER_NAME = st.tuples(st.sampled_from("abcxyz_0123456789"), ASCII_WORD).map(lambda t: (t[0] + t[1])[:32])
NAMES = ["tor", "dante", "web", "u1", "http_proxy", "Socks-2", "x"]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mp-fuzz-config-") as d:
        yield Path(d)


def run_t(path: Path) -> tuple[int, str, str]:
    """``subgraph_metaproxy -t -c path`` in-process; a traceback fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["-t", "-c", str(path)])
        except SystemExit as e:  # argparse; not expected with these arguments
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def judge(path: Path, code: int, out: str, err: str) -> None:
    """The contract of -t, whatever the input."""
    assert "Traceback" not in out + err, err
    if code == 0:
        assert out.startswith(f"{path}: configuration OK"), out
        assert "destination port -> upstream" in out, out
        return
    assert code == EX_CONFIG, f"exit {code}: {err}"
    lines = err.splitlines()
    assert lines, "exit 78 with no problem line"
    stray = [line for line in lines if not line.startswith(f"{path}:")]
    assert not stray, f"problem lines that do not start with the file name: {stray}"


def write(workdir: Path, name: str, data: bytes) -> Path:
    path = workdir / name
    path.write_bytes(data)
    return path


# ---- generators: configobj ------------------------------------------------------------

# Tor's virtual ranges, the default [firewall] tor_virtual_networks: no real host,
# so a listening or upstream address inside them is rightly refused.
VIRTUAL = (ipaddress.ip_network("10.192.0.0/10"), ipaddress.ip_network("fe80::/10"))


def _real(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not any(address in net for net in VIRTUAL if net.version == address.version)


def ipv4() -> st.SearchStrategy[str]:
    return st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address).filter(_real).map(str)


def ipv6() -> st.SearchStrategy[str]:
    return st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(_real).map(str)


def port() -> st.SearchStrategy[int]:
    return st.integers(1, 65535)


@st.composite
def upstream_body(draw: st.DrawFn) -> list[str]:
    kind = draw(st.sampled_from(["socks5", "socks4", "socks4a", "http"]))
    form = draw(st.sampled_from(["v4", "v6", "unix"] if kind == "socks5" else ["v4", "v6"]))
    if form == "v4":
        address = f"{draw(ipv4())}:{draw(port())}"
    elif form == "v6":
        address = f"[{draw(ipv6())}]:{draw(port())}"
    else:
        address = "unix:/" + "/".join(draw(st.lists(ASCII_WORD, min_size=1, max_size=3)))
    lines = [f"type = {kind}", f"address = {address}"]
    if draw(st.booleans()):
        lines.append(f"username = {draw(ASCII_WORD)}")
        # socks5 and http need both or neither; socks4 has a user id only.
        if kind in ("socks5", "http"):
            lines.append(f"password = {draw(ASCII_WORD)}")
    if draw(st.booleans()):
        lines.append(f"isolation = {draw(st.sampled_from(['connection', 'destination', 'user', 'none']))}")
    if draw(st.booleans()):
        lines.append(f"connect_timeout = {draw(st.floats(0.1, 600)):.3f}")
    return lines


@st.composite
def daemon_lines(draw: st.DrawFn) -> list[str]:
    choices = {
        "listen": st.lists(st.one_of(ipv4(), ipv6()), min_size=1, max_size=3).map(", ".join),
        "port": port().map(str),
        "mode": st.sampled_from(["redirect", "tproxy"]),
        "user": USER_NAME,
        "max_connections": st.integers(1, 1_000_000).map(str),
        "idle_timeout": st.integers(0, 604800).map(str),
        "connect_timeout": st.integers(1, 600).map(str),
        "drain_timeout": st.integers(0, 3600).map(str),
        "log_destinations": st.sampled_from(["yes", "no", "true", "false", "on", "off"]),
        "log_connections": st.sampled_from(["yes", "no", "true", "false", "on", "off"]),
        "seccomp": st.sampled_from(["kill", "log", "trap", "off"]),
    }
    keys = draw(st.lists(st.sampled_from(sorted(choices)), unique=True))
    return [f"{k} = {draw(choices[k])}" for k in keys]


@st.composite
def valid_configobj(draw: st.DrawFn) -> tuple[str, list[int]]:
    """A valid config and the single ports it routes."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    out = ["# generated", "[daemon]", *draw(daemon_lines()), "[upstreams]"]
    for name in names:
        out.append(f"    [[{name}]]")
        out += ["    " + line for line in draw(upstream_body())]
    out.append("[routes]")
    ports = draw(st.lists(port(), max_size=8, unique=True))
    singles = [p for p in ports]
    grouped = draw(st.booleans()) and len(ports) > 2
    if grouped:
        out.append(f'"{", ".join(map(str, ports[:3]))}" = {draw(st.sampled_from(names))}')
        ports = ports[3:]
    out += [f"{p} = {draw(st.sampled_from(names))}" for p in ports]
    bounds = sorted(set(draw(st.lists(st.integers(1, 65535), max_size=6))) - set(singles))
    for first, last in zip(bounds[::2], bounds[1::2]):
        out.append(f'"{first}-{last}" = {draw(st.sampled_from(names))}')
    if draw(st.booleans()):
        out.append(f"* = {draw(st.sampled_from(names))}")
    return "\n".join(out) + "\n", singles


JUNK = st.sampled_from(["[", "]", "[[", "]]", "=", "==", '"', "'", "'''", ",", "#", "\n", " ", "\t",
                        "*", "-", ":", "unix:", "[::1]", "127.0.0.1", "socks5", "http", "daemon",
                        "upstreams", "routes", "firewall", "type", "address", "port", "listen",
                        "65536", "0", "-1", "1e9", "nan", "\\", "%(x)s", "\x00", "\ufeff", "é", "\r"])


@st.composite
def broken_configobj(draw: st.DrawFn) -> bytes:
    """A valid config, then one to three edits that usually break it."""
    text, _ = draw(valid_configobj())
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "junk", "truncate", "value", "indent"]))
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        if not lines:
            lines = [""]
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "junk":
            lines.insert(i, "".join(draw(st.lists(JUNK, min_size=1, max_size=12))))
        elif op == "truncate":
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        elif op == "value":
            key = lines[i].split("=", 1)[0] if "=" in lines[i] else lines[i]
            lines[i] = key + "= " + "".join(draw(st.lists(JUNK, max_size=6)))
        else:
            lines[i] = draw(st.sampled_from(["[", "[[", "[[[", "    "])) + lines[i]
    return "\n".join(lines).encode("utf-8", "surrogatepass")


# ---- generators: legacy JSON ------------------------------------------------------------

@st.composite
def valid_json(draw: st.DrawFn) -> tuple[str, list[int]]:
    ports = draw(st.lists(port(), min_size=1, max_size=6, unique=True))
    relays = []
    for p in ports:
        kind = draw(st.sampled_from(["SOCKS5", "HTTP_CONNECT", "socks5", "http_connect"]))
        form = draw(st.sampled_from(["v4", "v6", "unix"] if kind.upper() == "SOCKS5" else ["v4", "v6"]))
        ip = {"v4": draw(ipv4()), "v6": draw(ipv6()), "unix": "unix:/run/tor/socks"}[form]
        relays.append({"destinationport": draw(st.sampled_from([str(p), p])), "relaytype": kind,
                       "relayip": ip, "relayport": str(draw(port()))})
    if draw(st.booleans()):
        relays.append({"destinationport": "*", "relaytype": "SOCKS5", "relayip": "127.0.0.1",
                       "relayport": "9050"})
    return json.dumps({"Relays": relays}, indent=draw(st.sampled_from([None, 2]))), ports


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      ASCII_WORD, st.sampled_from(["*", "SOCKS5", "HTTP_CONNECT", "unix:/x", "::1", "",
                                                   "127.0.0.1", "65536", "0", "\u0000", "\ud800"]))
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["Relays", "destinationport", "relaytype", "relayip", "relayport",
                                     "x", ""]), inner, max_size=5)), max_leaves=20)


@st.composite
def broken_json(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["any", "relays", "edit", "cut"]))
    if shape == "any":
        value = {"Relays": draw(JSON_ANY)} if draw(st.booleans()) else draw(st.dictionaries(
            st.sampled_from(["Relays", "relays", "x"]), JSON_ANY, max_size=3))
        return json.dumps(value).encode("utf-8", "surrogatepass")
    text, _ = draw(valid_json())
    data = json.loads(text)
    if shape == "relays":
        relay = draw(st.sampled_from(data["Relays"]))
        key = draw(st.sampled_from(["destinationport", "relaytype", "relayip", "relayport", "extra"]))
        if draw(st.booleans()):
            relay.pop(key, None)
        else:
            relay[key] = draw(JSON_ANY)
        return json.dumps(data).encode("utf-8", "surrogatepass")
    raw = text.encode()
    if shape == "cut":
        return raw[:draw(st.integers(1, len(raw)))]
    i = draw(st.integers(0, len(raw) - 1))
    return raw[:i] + draw(st.binary(min_size=1, max_size=4)) + raw[i + 1:]


# ---- tests ----------------------------------------------------------------------------

def test_generated_valid_configobj_passes_and_lists_every_route(workdir: Path) -> None:
    """Valid configobj configs: exit 0, and the table shows every routed port."""
    @FUZZ
    @given(valid_configobj())
    def one(case: tuple[str, list[int]]) -> None:
        text, ports = case
        path = write(workdir, "valid.conf", text.encode())
        code, out, err = run_t(path)
        judge(path, code, out, err)
        assert code == 0, f"a valid config was rejected:\n{text}\n{err}"
        table = out.split("destination port -> upstream\n", 1)[1]
        listed = {line.split("->")[0].strip() for line in table.splitlines() if "->" in line}
        assert {str(p) for p in ports} <= listed, out
    one()


def test_generated_broken_configobj_is_an_error_or_ok_never_a_traceback(workdir: Path) -> None:
    """Valid configs with lines deleted, duplicated, swapped, cut or replaced by junk."""
    @FUZZ
    @given(broken_configobj())
    def one(data: bytes) -> None:
        path = write(workdir, "broken.conf", data)
        judge(path, *run_t(path))
    one()


def test_generated_valid_legacy_json_passes(workdir: Path) -> None:
    """The original's {"Relays": [...]} format: exit 0, flagged as legacy, every port listed."""
    @FUZZ
    @given(valid_json())
    def one(case: tuple[str, list[int]]) -> None:
        text, ports = case
        path = write(workdir, "legacy.json", text.encode())
        code, out, err = run_t(path)
        judge(path, code, out, err)
        assert code == 0 and "(legacy JSON format)" in out, f"{text}\n{err}"
        for p in ports:
            assert f"{p:>11} -> " in out, out
    one()


def test_generated_broken_json_is_an_error_or_ok_never_a_traceback(workdir: Path) -> None:
    """JSON of any shape, relays with keys missing or of the wrong type, cut or edited bytes."""
    @FUZZ
    @given(broken_json())
    def one(data: bytes) -> None:
        path = write(workdir, "broken.json", data)
        judge(path, *run_t(path))
    one()


@pytest.mark.parametrize("prefix", [b"", b"{", b"[daemon]\n"], ids=["raw", "json", "configobj"])
def test_random_bytes_and_syntax_soup_never_end_in_a_traceback(workdir: Path, prefix: bytes) -> None:
    """Random bytes (invalid UTF-8 included) and random tokens of both syntaxes."""
    soup = st.lists(JUNK, max_size=60).map(lambda t: "".join(t).encode("utf-8", "surrogatepass"))

    @FUZZ
    @given(st.one_of(st.binary(max_size=2000), soup))
    def one(data: bytes) -> None:
        path = write(workdir, "random.conf", prefix + data)
        judge(path, *run_t(path))
    one()


@pytest.mark.parametrize("name, data", [
    ("deep.json", b'{"Relays": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("deep-value.json", b'{"Relays": [{"destinationport": ' + b"[" * 5000 + b"]" * 5000
     + b', "relaytype": "SOCKS5", "relayip": "127.0.0.1", "relayport": "1"}]}'),
    ("long-int.json", b'{"Relays": [{"destinationport": ' + b"9" * 5000
     + b', "relaytype": "SOCKS5", "relayip": "127.0.0.1", "relayport": "1"}]}'),
], ids=["deep", "deep-value", "long-int"])
def test_json_beyond_the_parsers_limits_is_a_config_error(workdir: Path, name: str, data: bytes) -> None:
    """Nesting deeper than the stack, or an integer longer than Python converts, is a
    config error (exit 78) naming the file, not a RecursionError or ValueError traceback."""
    path = write(workdir, name, data)
    code, out, err = run_t(path)
    judge(path, code, out, err)
    assert code == EX_CONFIG


def test_single_listen_address_is_a_list_of_one(workdir: Path) -> None:
    """``listen = 127.0.0.1`` (one address, no comma) is valid: a list of one."""
    path = write(workdir, "listen.conf", b"[daemon]\nlisten = 127.0.0.1\n")
    code, out, err = run_t(path)
    judge(path, code, out, err)
    assert code == 0 and "listen 127.0.0.1 port" in out, err


def test_listen_with_no_address_is_a_config_error(workdir: Path) -> None:
    """``listen = ,`` (an empty list) would bind nothing and serve nobody: exit 78."""
    path = write(workdir, "nolisten.conf", b"[daemon]\nlisten = ,\n")
    code, out, err = run_t(path)
    judge(path, code, out, err)
    assert code == EX_CONFIG and "[daemon] listen:" in err, out + err


@pytest.mark.parametrize("body, key", [
    ("type = socks5\naddress = 127.0.0.1:1080\nusername = caf\u00e9\npassword = pw\n", "username"),
    ("type = socks5\naddress = 127.0.0.1:1080\nusername = u\npassword = p\u00e4ss\n", "password"),
    ("type = socks4\naddress = 127.0.0.1:1080\nusername = \u00fcser\n", "username"),
    ("type = http\naddress = 127.0.0.1:3128\nusername = a:b\npassword = pw\n", "username"),
    ("type = http\naddress = 127.0.0.1:3128\nusername = \u20ac\npassword = pw\n", "username"),
], ids=["socks5-user", "socks5-password", "socks4-user", "http-colon", "http-euro"])
def test_credentials_the_protocol_cannot_carry_are_config_errors(workdir: Path, body: str, key: str) -> None:
    """SOCKS credentials are ASCII on the wire and an HTTP Basic user name cannot hold ':'.
    Such a config used to pass -t and then fail every connection at the handshake."""
    text = "[upstreams]\n    [[up]]\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "[routes]\n* = up\n"
    path = write(workdir, "creds.conf", text.encode())
    code, out, err = run_t(path)
    judge(path, code, out, err)
    assert code == EX_CONFIG and f"[upstreams][[up]] {key}:" in err, err
    assert "p\u00e4ss" not in err, "a password was echoed"


def test_real_entry_point_on_a_few_inputs(workdir: Path) -> None:
    """The same contract through ``/usr/bin/python3 -m metaproxy -t`` (a real process)."""
    cases = [b"", b"\xff\xfe\x00garbage", b"[daemon]\nport = 0\n", b'{"Relays": [', b"[routes]\n* = nowhere\n",
             b'{"Relays": [{"destinationport": "*", "relaytype": "SOCKS5", "relayip": "127.0.0.1", '
             b'"relayport": "9050"}]}']
    for i, data in enumerate(cases):
        path = write(workdir, f"real{i}.conf", data)
        proc = subprocess.run(["/usr/bin/python3", "-m", "metaproxy", "-t", "-c", str(path)],
                              capture_output=True, timeout=30, cwd=REPO,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
                                   "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"})
        judge(path, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def test_unreadable_paths_are_config_errors(workdir: Path) -> None:
    """A missing file, a directory, and /dev/zero (endless) are errors naming the path."""
    for path in (workdir / "missing.conf", workdir, Path("/dev/zero")):
        judge(path, *run_t(path))
        assert run_t(path)[0] == EX_CONFIG
