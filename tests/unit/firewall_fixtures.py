"""Shared by the firewall unit tests (not a test module): a small config, and the golden files.

The golden files (tests/unit/golden/firewall/) hold ``--print-rules`` output, byte for byte,
for every back-end, mode and strictness; test_firewall_iptables_golden.py and
test_firewall_nftables_golden.py compare against them. After a deliberate change to the
rules, regenerate them with

    METAPROXY_UPDATE_GOLDEN=1 make unit

and review the diff like code: it is exactly what users will load.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from metaproxy.config import load
from metaproxy.config.model import Config
from metaproxy.firewall import BACKENDS, render

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "firewall"
UPDATE = os.environ.get("METAPROXY_UPDATE_GOLDEN") == "1"
# redirect, tproxy: this host's programs; gateway, gateway-tproxy: clients behind it too.
CONFIGS = ("redirect", "tproxy", "gateway", "gateway-tproxy")


def config(tmp_path: pathlib.Path, *, daemon: str = "", upstreams: str = "", dns: str = "",
           exempt: list[str] | None = None, firewall: str = "") -> Config:
    """A config with a LAN SOCKS upstream, plus whatever the test adds."""
    path = tmp_path / "fw.conf"
    path.write_text(f"""
[daemon]
user = nobody
{daemon}
[upstreams]
    [[lan]]
    type = socks5
    address = 192.0.2.2:1080
{upstreams}
[routes]
* = lan
[firewall]
dns = "{dns}"
exempt_users = {", ".join(exempt or []) or ","}
{firewall}
""")
    return load(str(path))


def golden_cases(backends: tuple[str, ...]) -> list[tuple[str, str, bool, bool]]:
    """(mode, backend, strict, unload) for every golden file of ``backends``."""
    return [(mode, backend, strict, unload)
            for mode in CONFIGS
            for backend in backends
            for strict in (False, True)
            for unload in (False, True)]


def golden_name(mode: str, backend: str, strict: bool, unload: bool) -> str:
    return f"{mode}{'.strict' if strict else ''}.{backend}{'.unload' if unload else ''}"


def check_golden(mode: str, backend: str, strict: bool, unload: bool) -> None:
    """The generated ruleset (or its removal) equals the reviewed golden file."""
    config = load(str(GOLDEN / f"{mode}.conf"))
    text = render(config, backend, strict=strict, unload=unload)
    path = GOLDEN / golden_name(mode, backend, strict, unload)
    if UPDATE:
        path.write_text(text)
    if not path.exists():
        pytest.fail(f"{path} is missing; create it with METAPROXY_UPDATE_GOLDEN=1", pytrace=False)
    assert text == path.read_text(), f"{path.name} differs; see the diff above, or regenerate deliberately"


def golden_files_of(backends: tuple[str, ...]) -> set[str]:
    """The golden files in the directory that belong to ``backends``, by the back-end in their name."""
    return {p.name for p in GOLDEN.iterdir() if set(p.name.split(".")) & set(backends)}


def stray_golden_files() -> set[str]:
    """Files in the directory that are neither an input config nor any back-end's output."""
    return {p.name for p in GOLDEN.iterdir()} - {f"{name}.conf" for name in CONFIGS} - golden_files_of(BACKENDS)


def same_rules_from_another_path(tmp_path: pathlib.Path, backend: str) -> None:
    """The same config under another path gives the same text (goldens stay stable)."""
    copy = tmp_path / "elsewhere.conf"
    copy.write_text((GOLDEN / "redirect.conf").read_text())
    a = render(load(str(GOLDEN / "redirect.conf")), backend, strict=True)
    b = render(load(str(copy)), backend, strict=True)
    assert a == b
