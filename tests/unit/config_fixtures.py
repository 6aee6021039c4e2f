"""What the config and command-line tests share: a minimal valid config, files, and -t in-process."""

from __future__ import annotations

import contextlib
import io
import pathlib

import pytest

from metaproxy import cli
from metaproxy.config import load
from metaproxy.errors import ConfigError

UPSTREAM = "[upstreams]\n    [[tor]]\n    type = socks5\n    address = 127.0.0.1:9050\n"
ROUTES = "[routes]\n* = tor\n"


def write(tmp_path: pathlib.Path, text: str, name: str = "m.conf") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: pathlib.Path | str) -> list[str]:
    """The problem lines of a config that must not load."""
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    return caught.value.problems


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``cli.main`` in-process: exit code, stdout, stderr (SystemExit included)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()
