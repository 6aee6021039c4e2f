"""--print-rules iptables and ip6tables, byte for byte, against the reviewed golden files in
tests/unit/golden/firewall/ (how to regenerate them: tests/unit/firewall_fixtures.py)."""

from __future__ import annotations

import pathlib

import pytest

from tests.unit.firewall_fixtures import (
    check_golden, golden_cases, golden_files_of, golden_name, same_rules_from_another_path,
)

HERE = ("iptables", "ip6tables")
CASES = golden_cases(HERE)


@pytest.mark.parametrize(("mode", "backend", "strict", "unload"), CASES,
                         ids=[golden_name(*case) for case in CASES])
def test_rules_equal_the_golden_file(mode: str, backend: str, strict: bool, unload: bool) -> None:
    """The generated ruleset (or its removal) equals the reviewed golden file."""
    check_golden(mode, backend, strict, unload)


def test_every_iptables_golden_file_belongs_to_a_case() -> None:
    """No stale golden file lingers after a case is removed."""
    assert golden_files_of(HERE) == {golden_name(*case) for case in CASES}


@pytest.mark.parametrize("backend", HERE)
def test_config_source_path_does_not_leak_into_the_rules(tmp_path: pathlib.Path, backend: str) -> None:
    """The same config under another path gives the same text (goldens stay stable)."""
    same_rules_from_another_path(tmp_path, backend)
