"""The command line (metaproxy.cli): what it hands the daemon, and how it exits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from metaproxy import cli, daemon
from metaproxy.errors import EX_USAGE
from tests.unit.config_fixtures import run_cli

CONFIG = "[upstreams]\n    [[tor]]\n    type = socks5\n    address = 127.0.0.1:9050\n[routes]\n* = tor\n"


def test_a_relative_config_path_reaches_the_daemon_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drop chdirs to /, and a reload re-reads config.source: it must not depend on the cwd."""
    (tmp_path / "m.conf").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    seen: list[str] = []

    def run(config: Any, **kwargs: object) -> int:
        seen.append(config.source)
        return 0
    monkeypatch.setattr(daemon, "run", run)
    assert cli.main(["-c", "m.conf"]) == 0
    assert seen == [str(tmp_path / "m.conf")]


def test_cli_exits_70_on_an_unexpected_error_and_keeps_its_text_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "m.conf"
    conf.write_text(CONFIG)

    def broken(*args: object, **kwargs: object) -> int:
        raise KeyError("198.51.100.2")
    monkeypatch.setattr(daemon, "run", broken)
    logging.getLogger("metaproxy").handlers.clear()
    assert cli.main(["-c", str(conf)]) == 70
    err = capsys.readouterr().err
    assert "internal error: KeyError at " in err and "198.51.100.2" not in err


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

