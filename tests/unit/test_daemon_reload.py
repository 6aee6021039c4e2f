"""SIGHUP's reload: what it takes from the file, and what it says needs a restart."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from metaproxy import daemon
from metaproxy.config import replace_port
from tests.unit.test_relay_server import make_server, run


def reload_and_log(tmp_path: Path, caplog: pytest.LogCaptureFixture, port_override: int | None) -> tuple[int, str]:
    async def body() -> tuple[int, str]:
        server = make_server(tmp_path)
        try:
            if port_override:
                server.apply(replace_port(server.config, port_override))
            (tmp_path / "metaproxy.conf").write_text(
                (tmp_path / "metaproxy.conf").read_text().replace("* = tor", "80 = tor"))
            with caplog.at_level(logging.INFO, logger="metaproxy"):
                daemon._reload(server, port_override)
            assert server.config.routes.lookup(22) is None, "the new routes were not applied"
            return server.config.daemon.port, caplog.text
        finally:
            for sock in server.listeners:
                sock.close()
            server.poller.close()
    return run(body)


def test_a_port_given_with_p_is_kept_and_not_reported_as_changed(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    port, text = reload_and_log(tmp_path, caplog, port_override=40999)
    assert port == 40999
    assert "takes a restart" not in text and "reloaded routes and upstreams" in text


def test_a_changed_listen_setting_is_reported_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> str:
        server = make_server(tmp_path)
        try:
            path = tmp_path / "metaproxy.conf"
            path.write_text(path.read_text().replace("user = nobody", "user = daemon"))
            with caplog.at_level(logging.INFO, logger="metaproxy"):
                daemon._reload(server)
            assert server.config.daemon.user == "nobody"
            return caplog.text
        finally:
            for sock in server.listeners:
                sock.close()
            server.poller.close()
    assert "[daemon] user changed; that takes a restart" in run(body)


def test_the_reload_policy_is_declared_once_on_the_settings() -> None:
    """What a SIGHUP may change is read from DaemonSettings, and nothing else decides it:
    the listeners, the user, the sandbox and the debug warning were set up before serving."""
    from metaproxy.config.model import DaemonSettings
    assert set(DaemonSettings.restart_only()) == {"listen", "port", "mode", "user", "groups", "seccomp",
                                                    "log_destinations"}
    assert set(DaemonSettings.reloadable()) == {"max_connections", "idle_timeout", "connect_timeout",
                                                "drain_timeout", "log_connections", "log_refusals"}
