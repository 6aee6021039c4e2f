"""``-t`` checks a config file: the relay table and exit 0, or one line per problem and exit 78.
Each problem line names the file and the line."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.system.daemon import check_config, metaproxy_argv
from tests.system.lab import REPO, clean_env, run
from tests.system.topology import UPSTREAMS, shared_config

EX_CONFIG = 78


@pytest.fixture
def conf_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"mp{os.getpid()}-conf-") as directory:
        yield Path(directory)


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_shipped_config_passes_and_prints_the_table() -> None:
    """The shipped etc/subgraph_metaproxy.conf is valid: every port goes to tor."""
    code, out, err = check_config(REPO / "etc" / "subgraph_metaproxy.conf")
    assert code == 0, err
    assert "127.0.0.1:9050" in out and "*" in out, out
    assert err == "", err


def test_lab_config_passes_and_lists_every_route(conf_dir: Path) -> None:
    """The lab's own config passes, and the table shows each routed port and unrouted ports refused."""
    path = _write(conf_dir, "lab.conf", shared_config(8675, Path("/run/lab/socks.sock")))
    code, out, err = check_config(path)
    assert code == 0, err
    for port, _ in UPSTREAMS.values():
        assert re.search(rf"\b{port}\b.*->", out), f"port {port} missing from the table:\n{out}"
    assert "unix:/run/lab/socks.sock" in out, out
    assert "refused" in out, out


def test_legacy_json_passes_and_prints_equivalent_text(conf_dir: Path) -> None:
    """A legacy JSON file passes -t, which also shows the configobj text to move to."""
    path = _write(conf_dir, "legacy.json", json.dumps({"Relays": [
        {"destinationport": "80", "relaytype": "SOCKS5", "relayip": "192.0.2.2", "relayport": "1080"},
        {"destinationport": "*", "relaytype": "HTTP_CONNECT", "relayip": "192.0.2.2", "relayport": "3128"}]}))
    code, out, err = check_config(path)
    assert code == 0, err
    assert "[upstreams]" in out and "address = 192.0.2.2:1080" in out, out


# Each bad file: its text, and the line numbers (1-based) where the problems are.
BAD_FILES = {
    "unknown_key": ("[daemon]\nport = 8675\nlisten_port = 1\n[upstreams]\n    [[tor]]\n    type = socks5\n"
                    "    address = 127.0.0.1:9050\n    colour = blue\n[routes]\n* = tor\n", [3, 8]),
    "port_out_of_range": ("[daemon]\nport = 70000\n[upstreams]\n    [[tor]]\n    type = socks5\n"
                          "    address = 127.0.0.1:9050\n[routes]\n* = tor\n", [2]),
    "bad_address": ("[upstreams]\n    [[tor]]\n    type = socks5\n    address = tor.example:9050\n"
                    "[routes]\n* = tor\n", [4]),
    "undefined_upstream": ("[upstreams]\n    [[tor]]\n    type = socks5\n    address = 127.0.0.1:9050\n"
                           "[routes]\n80 = tor\n443 = nosuch\n", [7]),
    "unix_on_http": ("[upstreams]\n    [[web]]\n    type = http\n    address = unix:/run/proxy.sock\n"
                     "[routes]\n* = web\n", [4]),
    "bad_type_and_isolation": ("[upstreams]\n    [[tor]]\n    type = socks6\n    address = 127.0.0.1:9050\n"
                               "    isolation = sometimes\n[routes]\n* = tor\n", [3, 5]),
    "json_syntax": ('{"Relays": [\n  {"destinationport": "80",\n   "relaytype": "SOCKS5"\n   "relayip": "x"}\n]}\n',
                    [4]),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_config_exits_78_with_one_line_per_problem_naming_file_and_line(conf_dir: Path, name: str) -> None:
    """A wrong file makes -t exit 78 (EX_CONFIG) and print one line per problem,
    each starting with file:line; nothing is a traceback."""
    text, lines = BAD_FILES[name]
    path = _write(conf_dir, f"{name}.conf", text)
    code, out, err = check_config(path)
    assert code == EX_CONFIG, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    problems = [line for line in err.splitlines() if line.strip()]
    assert len(problems) == len(lines), f"expected {len(lines)} problem lines, got:\n{err}"
    named = sorted(int(m.group(1)) for m in (re.match(rf"{re.escape(str(path))}:(\d+)\b", p) for p in problems) if m)
    assert named == lines, f"expected problems at lines {lines}, each line starting with {path}:LINE; got:\n{err}"


def test_missing_file_exits_78_naming_it(conf_dir: Path) -> None:
    """A file that does not exist is a config error naming the file, not a traceback."""
    path = conf_dir / "nonexistent.conf"
    code, _, err = check_config(path)
    assert code == EX_CONFIG, err
    assert str(path) in err and "Traceback" not in err, err


# ---- refusals, warnings and usage errors of -t, through the real entry point ----------

EX_USAGE = 64


def test_pathological_lines_are_reported_at_once(conf_dir: Path) -> None:
    """2,000 spaces then x took 5.4 s, [ then 2,000 spaces 13.7 s; now both are one syntax
    error each, with their lines, well inside the check's timeout."""
    path = _write(conf_dir, "slow.conf", " " * 2000 + "x\n" + "[" + " " * 2000 + "\n")
    code, _, err = check_config(path, timeout=10)
    assert code == EX_CONFIG, err
    assert [line.split(": ")[0] for line in err.splitlines()] == [f"{path}:1", f"{path}:2"], err


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_config_that_is_not_a_regular_file_is_refused_in_one_line(conf_dir: Path, kind: str) -> None:
    """A FIFO that nobody writes to used to block -t (and ExecStartPre) forever."""
    path = conf_dir / f"{kind}.conf"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/null")
    code, out, err = check_config(path, timeout=10)
    assert (code, out) == (EX_CONFIG, ""), err
    assert len(err.splitlines()) == 1 and "expected the config as a regular file" in err, err


def test_a_config_without_routes_passes_with_a_warning(conf_dir: Path) -> None:
    path = _write(conf_dir, "noroutes.conf", "[upstreams]\n    [[tor]]\n    type = socks5\n"
                                             "    address = 127.0.0.1:9050\n")
    code, out, err = check_config(path)
    assert code == 0 and "configuration OK" in out, err
    assert "every connection will be refused" in err, err


@pytest.mark.parametrize("mode", [["-t"], ["--print-rules", "iptables"]], ids=["t", "print-rules"])
def test_exempt_users_the_rules_refuse_fail_t_and_print_rules_with_the_line(conf_dir: Path,
                                                                           mode: list[str]) -> None:
    """``exempt_users = "debian tor"`` passed -t but failed --print-rules, without a line."""
    path = _write(conf_dir, "exempt.conf", "[upstreams]\n    [[tor]]\n    type = socks5\n"
                                           "    address = 127.0.0.1:9050\n[routes]\n* = tor\n"
                                           '[firewall]\nexempt_users = "debian tor"\n')
    proc = run(metaproxy_argv([*mode, "-c", str(path)]), check=False, timeout=20, cwd=REPO,
               env=clean_env(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1"))
    err = proc.stderr.decode(errors="replace")
    assert (proc.returncode, proc.stdout) == (EX_CONFIG, b""), err
    assert err.startswith(f"{path}:8: [firewall] exempt_users:"), err


@pytest.mark.parametrize("kind", ["socks5", "http"])
def test_a_username_without_a_password_fails_t_with_the_line(conf_dir: Path, kind: str) -> None:
    path = _write(conf_dir, "user.conf", f"[upstreams]\n    [[up]]\n    type = {kind}\n"
                                         "    address = 127.0.0.1:1080\n    username = alice\n[routes]\n* = up\n")
    code, _, err = check_config(path)
    assert code == EX_CONFIG and err.startswith(f"{path}:5: [upstreams][[up]] username:"), err


@pytest.mark.parametrize("args", [["-p", "0"], ["-p", "65536"], ["--no-such-option"], ["--strict"]],
                         ids=["port-0", "port-65536", "unknown", "strict-alone"])
def test_usage_errors_exit_64_with_argparses_message(args: list[str]) -> None:
    proc = run(metaproxy_argv(["-t", *args]), check=False, timeout=20, cwd=REPO,
               env=clean_env(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1"))
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == EX_USAGE, err
    assert err.startswith("usage: subgraph_metaproxy") and "subgraph_metaproxy: error: " in err, err
