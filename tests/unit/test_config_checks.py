"""What ``-t`` must refuse, warn about or survive (issue 11 items 6-9, issue 10).

* A config of pathological lines is read in linear time, with line numbers.
* The config must be a regular file; opening it never blocks.
* A config with no routes passes, with a warning that everything is refused.
* ``-t`` runs the firewall's checks too, and names the line.
* Every usage error exits 64 (EX_USAGE) with argparse's message.
* A socks5 or http upstream with a username and no password is an error.
* ``[daemon] log_connections`` reaches the model, off by default.

The cases that could hang on a broken parser run in a child process with a
bounded wait, so that a regression fails the test instead of stalling the run.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import subprocess

import pytest

from metaproxy import cli
from metaproxy.config import load
from metaproxy.errors import EX_CONFIG, EX_USAGE, ConfigError
from metaproxy.firewall.plan import build
from metaproxy.firewall.rules import Mode, PlanError, Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
       "LANG": "C.UTF-8"}
UPSTREAM = "[upstreams]\n    [[tor]]\n    type = socks5\n    address = 127.0.0.1:9050\n"
ROUTES = "[routes]\n* = tor\n"


def write(tmp_path: pathlib.Path, text: str, name: str = "m.conf") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``cli.main`` in-process: exit code, stdout, stderr (SystemExit included)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def run_child(code: str, timeout: float = 20) -> str:
    """Python ``code`` in a child; its stdout. A child still running at ``timeout`` fails the test."""
    try:
        proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT, env=ENV)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: {code}", pytrace=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---- item 6: a parser that cannot hang ------------------------------------------------

PATHOLOGICAL = [
    " " * 2000 + "x",                 # 5.4 s each through the old regexes
    "[" + " " * 2000,                 # 13.7 s
    "[" * 2000,
    "[a" + " ]" * 1000 + "x",
    "a" + " " * 2000,
    '"' + " " * 2000,
    "a = " + "x, " * 600 + '"',
    "b = x," + " " * 2000 + '"x" y',
    "c = " + '"",' * 600 + '"x" y',
]


def test_a_mebibyte_of_pathological_lines_is_checked_in_under_a_second(tmp_path: pathlib.Path) -> None:
    """1 MiB of lines that made the old regexes backtrack for seconds each: one problem
    per line, each with its own line number, in well under a second (measured in a child)."""
    lines, size = [], 0
    while True:
        line = PATHOLOGICAL[len(lines) % len(PATHOLOGICAL)]
        if size + len(line) + 1 > 1 << 20:
            break
        lines.append(line)
        size += len(line) + 1
    path = write(tmp_path, "\n".join(lines) + "\n")
    assert path.stat().st_size <= 1 << 20
    out = run_child(
        "import time\nfrom metaproxy.config import load\nfrom metaproxy.errors import ConfigError\n"
        f"start = time.monotonic()\ntry:\n    load({str(path)!r})\nexcept ConfigError as e:\n"
        "    problems = e.problems\nprint(time.monotonic() - start)\nprint('\\n'.join(problems))\n")
    elapsed, *problems = out.splitlines()
    assert float(elapsed) < 1.0, f"{len(lines)} lines took {float(elapsed):.2f} s"
    numbers = [int(m.group(1)) for m in (re.match(rf"{re.escape(str(path))}:(\d+): ", p) for p in problems) if m]
    assert len(numbers) == len(problems), problems[:3]
    # Every line is wrong, and each problem names its own line.
    assert numbers == list(range(1, len(lines) + 1))
    assert all(len(p) < 300 for p in problems), "a problem line quotes the offending text"


def test_line_numbers_survive_long_and_odd_lines(tmp_path: pathlib.Path) -> None:
    """The index that gives each key its line is the same linear scan."""
    path = write(tmp_path, "# " + "x" * 100_000 + "\n[daemon]\n\n    " + " " * 5000 + "\n"
                 "port = 99999\n" + UPSTREAM + "    isolation = sometimes\n" + ROUTES)
    found = sorted(int(p.split(":")[1]) for p in _problems(path))
    assert found == [5, 10]


def test_values_lists_quotes_and_comments_read_as_configobj_reads_them(tmp_path: pathlib.Path) -> None:
    config = load(str(write(tmp_path, '[daemon]\n  listen = "127.0.0.1" , ::1   # both\nuser = "tor"\n'
                                      "[ 'upstreams' ]\n[[tor]]\ntype = socks5 # comment\n"
                                      "username = 'a#b'\npassword = \"c, d\"\n"
                                      "address = 127.0.0.1:9050\n"
                                      '[routes]\n"80, 443" = tor\n* = tor\n[firewall]\nexempt_users = ,\n')))
    assert config.daemon.listen == ("127.0.0.1", "::1")
    assert config.routes.lookup(443) == "tor" and config.firewall.exempt_users == ()
    assert (config.daemon.user, config.upstreams["tor"].username) == ("tor", "a#b")
    assert config.upstreams["tor"].password == "c, d"


@pytest.mark.parametrize("text, message", [
    ("[daemon]\nport = 1\n[daemon]\n", "written twice"),
    ("[daemon]\nport = 1\nport = 2\n", "written twice"),
    ("[[tor]]\n", "too many brackets"),
    ("[daemon]]\n", "as many ] as ["),
    ("[daemon]\nuser = 'abc\n", "closing quote"),
    ("[daemon]\nuser = \"a\" b\n", "after a quoted value"),
    ("[daemon]\nlisten = 127.0.0.1,,::1\n", "between two commas"),
    ("[daemon]\njust words\n", "neither"),
])
def test_syntax_errors_name_the_line_and_not_the_text(tmp_path: pathlib.Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    (problem,) = _problems(path)
    line = text.count("\n")
    assert problem.startswith(f"{path}:{line}: syntax error: ") and message in problem, problem


def _problems(path: pathlib.Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    return caught.value.problems


# ---- item 7: a regular file, and a warning for no routes -------------------------------

def test_a_fifo_is_refused_at_once_and_never_opened_for_a_blocking_read(tmp_path: pathlib.Path) -> None:
    """Nobody writes to the FIFO: open() without O_NONBLOCK would wait forever."""
    fifo = tmp_path / "c.conf"
    os.mkfifo(fifo)
    try:
        proc = subprocess.run([PYTHON, "-m", "metaproxy", "-t", "-c", str(fifo)], capture_output=True, text=True,
                              timeout=20, cwd=ROOT, env=ENV)
    except subprocess.TimeoutExpired:
        pytest.fail("-t blocked on a FIFO", pytrace=False)
    assert proc.returncode == EX_CONFIG
    assert proc.stderr == f"{fifo}: expected the config as a regular file, found a FIFO\n"


@pytest.mark.parametrize("make, kind", [
    (lambda p: p.mkdir(), "a directory"),
    (lambda p: p.symlink_to("/dev/null"), "a character device"),
], ids=["directory", "device"])
def test_a_directory_or_a_device_is_refused_with_one_line(tmp_path: pathlib.Path, make: object, kind: str) -> None:
    path = tmp_path / "c.conf"
    make(path)  # type: ignore[operator]
    code, out, err = run_cli("-t", "-c", str(path))
    assert (code, out) == (EX_CONFIG, "")
    assert err == f"{path}: expected the config as a regular file, found {kind}\n"


@pytest.mark.parametrize("text", ["", "# nothing\n", UPSTREAM, UPSTREAM + "[routes]\n"])
def test_a_config_with_no_routes_passes_with_a_warning(tmp_path: pathlib.Path, text: str) -> None:
    path = write(tmp_path, text)
    code, out, err = run_cli("-t", "-c", str(path))
    assert code == 0 and out.startswith(f"{path}: configuration OK"), err
    assert err == f"{path}: warning: [routes] is empty: every connection will be refused\n"


def test_a_config_with_routes_has_no_warning(tmp_path: pathlib.Path) -> None:
    code, _, err = run_cli("-t", "-c", str(write(tmp_path, UPSTREAM + ROUTES)))
    assert (code, err) == (0, "")


# ---- item 8: -t runs the firewall's checks, with the line ------------------------------

@pytest.mark.parametrize("section, key, value", [
    ("firewall", "exempt_users", '"debian tor"'),
    ("firewall", "exempt_users", "debian-tor, -j"),
    ("daemon", "user", '"a b"'),
])
@pytest.mark.parametrize("argv", [("-t",), ("--print-rules", "iptables"), ("--print-rules", "nftables", "--strict")],
                         ids=["t", "print-rules", "print-rules-strict"])
def test_a_user_name_the_rules_refuse_is_refused_by_t_with_its_line(
        tmp_path: pathlib.Path, section: str, key: str, value: str, argv: tuple[str, ...]) -> None:
    """``exempt_users = "debian tor"`` passed -t and then failed metaproxy-firewall.service."""
    text = UPSTREAM + ROUTES + f"[{section}]\n{key} = {value}\n"
    path = write(tmp_path, text)
    line = text.count("\n")
    code, out, err = run_cli(*argv, "-c", str(path))
    assert (code, out) == (EX_CONFIG, ""), err
    assert err.startswith(f"{path}:{line}: [{section}] {key}: expected a user name"), err


def test_t_accepts_what_the_rules_accept(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, UPSTREAM + ROUTES + "[firewall]\nexempt_users = debian-tor, 108, tor$\n")
    assert run_cli("-t", "-c", str(path))[0] == 0
    assert run_cli("--print-rules", "nftables", "--strict", "-c", str(path))[0] == 0


@pytest.mark.parametrize("name", ["debian-tor", "_metaproxy", "108", "Tor.user", "x$", "a" * 32, "a" * 33,
                                  "", "-j", ".x", "a b", "a\nb", "a\"b", "tor$$", "é"])
def test_the_config_and_the_rules_agree_on_user_names(name: str) -> None:
    """The loader's rule and metaproxy/firewall/plan.py's stay the same rule."""
    from metaproxy.config.addresses import is_user_name
    config_accepts = is_user_name(name)
    try:
        build(Settings(port=8675, mode=Mode.REDIRECT, strict=False, service_user="nobody", exempt_users=(name,)))
        rules_accept = True
    except PlanError:
        rules_accept = False
    assert config_accepts == rules_accept


# ---- item 9: usage errors exit 64 ------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["-p", "0"], "argument -p/--port: expected a port from 1 to 65535, found '0'"),
    (["-p", "65536"], "argument -p/--port: expected a port from 1 to 65535, found '65536'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--strict"], "--strict and --unload only apply to --print-rules"),
    (["--print-rules", "pf"], "argument --print-rules: invalid choice: 'pf'"),
])
def test_every_usage_error_exits_64_with_argparses_message(argv: list[str], message: str) -> None:
    code, out, err = run_cli(*argv)
    assert code == EX_USAGE, err
    assert err.startswith("usage: subgraph_metaproxy") and f"subgraph_metaproxy: error: {message}" in err, err


def test_help_and_version_still_exit_0() -> None:
    assert run_cli("--version")[0] == 0 and run_cli("--help")[0] == 0


# ---- issue 10: a username needs a password for socks5 and http -------------------------

@pytest.mark.parametrize("kind", ["socks5", "http"])
def test_a_username_without_a_password_is_an_error_with_its_line(tmp_path: pathlib.Path, kind: str) -> None:
    """It used to turn authentication (and, for socks5, isolation) off silently."""
    path = write(tmp_path, f"[upstreams]\n    [[up]]\n    type = {kind}\n    address = 127.0.0.1:1080\n"
                           "    username = alice\n[routes]\n* = up\n")
    code, out, err = run_cli("-t", "-c", str(path))
    assert (code, out) == (EX_CONFIG, "")
    assert err.startswith(f"{path}:5: [upstreams][[up]] username: expected a password with it"), err


@pytest.mark.parametrize("body", ["type = socks4\n    username = alice\n",
                                  "type = socks5\n    username = alice\n    password = pw\n",
                                  "type = http\n    username = alice\n    password = pw\n"])
def test_a_socks4_user_id_alone_or_both_credentials_pass(tmp_path: pathlib.Path, body: str) -> None:
    path = write(tmp_path, f"[upstreams]\n    [[up]]\n    {body}    address = 127.0.0.1:1080\n[routes]\n* = up\n")
    assert load(str(path)).upstreams["up"].username == "alice"


# ---- logging: log_connections ----------------------------------------------------------

def test_log_connections_is_off_by_default_and_read_from_daemon(tmp_path: pathlib.Path) -> None:
    assert load(str(write(tmp_path, UPSTREAM + ROUTES))).daemon.log_connections is False
    assert load(str(ROOT / "etc/subgraph_metaproxy.conf")).daemon.log_connections is False
    on = write(tmp_path, "[daemon]\nlog_connections = yes\n" + UPSTREAM + ROUTES, "on.conf")
    assert load(str(on)).daemon.log_connections is True
    bad = write(tmp_path, "[daemon]\nlog_connections = sometimes\n" + UPSTREAM + ROUTES, "bad.conf")
    (problem,) = _problems(bad)
    assert problem.startswith(f"{bad}:2: [daemon] log_connections: expected yes or no"), problem
