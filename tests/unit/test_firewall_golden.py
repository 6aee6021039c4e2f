"""--print-rules output, byte for byte, for every back-end, mode and strictness.

The configs and the expected text live in tests/unit/golden/firewall/. After a
deliberate change to the rules, regenerate them with

    METAPROXY_UPDATE_GOLDEN=1 make unit

and review the diff like code: it is exactly what users will load.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from metaproxy.config import load
from metaproxy.firewall import BACKENDS, render

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "firewall"
UPDATE = os.environ.get("METAPROXY_UPDATE_GOLDEN") == "1"

# redirect, tproxy: this host's programs; gateway, gateway-tproxy: clients behind it too.
CONFIGS = ("redirect", "tproxy", "gateway", "gateway-tproxy")
CASES = [(mode, backend, strict, unload)
         for mode in CONFIGS
         for backend in BACKENDS
         for strict in (False, True)
         for unload in (False, True)]


def golden_name(mode: str, backend: str, strict: bool, unload: bool) -> str:
    return f"{mode}{'.strict' if strict else ''}.{backend}{'.unload' if unload else ''}"


@pytest.mark.parametrize(("mode", "backend", "strict", "unload"), CASES,
                         ids=[golden_name(*case) for case in CASES])
def test_rules_equal_the_golden_file(mode: str, backend: str, strict: bool, unload: bool) -> None:
    """The generated ruleset (or its removal) equals the reviewed golden file."""
    config = load(str(GOLDEN / f"{mode}.conf"))
    text = render(config, backend, strict=strict, unload=unload)
    path = GOLDEN / golden_name(mode, backend, strict, unload)
    if UPDATE:
        path.write_text(text)
    if not path.exists():
        pytest.fail(f"{path} is missing; create it with METAPROXY_UPDATE_GOLDEN=1", pytrace=False)
    assert text == path.read_text(), f"{path.name} differs; see the diff above, or regenerate deliberately"


def test_every_golden_file_belongs_to_a_case() -> None:
    """No stale golden file lingers after a case is removed."""
    expected = {golden_name(*case) for case in CASES} | {f"{name}.conf" for name in CONFIGS}
    found = {p.name for p in GOLDEN.iterdir()}
    assert found == expected


def test_config_source_path_does_not_leak_into_the_rules(tmp_path: pathlib.Path) -> None:
    """The same config under another path gives the same text (goldens stay stable)."""
    copy = tmp_path / "elsewhere.conf"
    copy.write_text((GOLDEN / "redirect.conf").read_text())
    for backend in BACKENDS:
        a = render(load(str(GOLDEN / "redirect.conf")), backend, strict=True)
        b = render(load(str(copy)), backend, strict=True)
        assert a == b
