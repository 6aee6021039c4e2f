"""``-t`` checks a config file: the relay table and exit 0, or one line per problem and exit 78
(issue 2, item 10). Each problem line names the file and the line."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.system.daemon import check_config
from tests.system.lab import REPO
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
