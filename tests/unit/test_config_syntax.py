"""The configobj text reader (metaproxy.config.syntax): one linear pass, a problem per bad
line with its number and without its text.

The cases that could hang on a broken parser run in a child process with a
bounded wait, so that a regression fails the test instead of stalling the run.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

from metaproxy.config import load
from metaproxy.config import syntax
from metaproxy.errors import ConfigError
from tests.unit.config_fixtures import write

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
       "LANG": "C.UTF-8"}


def run_child(code: str, timeout: float = 20) -> str:
    """Python ``code`` in a child; its stdout. A child still running at ``timeout`` fails the test."""
    try:
        proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT, env=ENV)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: {code}", pytrace=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _problems(path: pathlib.Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    return caught.value.problems


# ---- a parser that cannot hang ---------------------------------------------------------

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


def test_syntax_error_names_the_line(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[daemon]\nport = 1\n[upstreams\n")
    found = _problems(path)
    assert found and found[0].startswith(f"{path}:3:")


def test_a_problem_names_its_line_and_never_repeats_the_text() -> None:
    """The text may hold a password, and -t's output goes to the journal."""
    parsed = syntax.parse("[upstreams]\n[[t]]\npassword = 's3cret-pw\n\n[daemon\n")
    assert [number for number, _ in parsed.problems] == [3, 5], parsed.problems
    assert not any("s3cret" in message for _, message in parsed.problems)
