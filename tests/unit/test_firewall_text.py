"""The comment text shared by the back-ends (metaproxy.firewall.text), and the tidiness of
the whole ruleset text."""

from __future__ import annotations

import pathlib
import re

import pytest

from metaproxy.firewall import BACKENDS, plan_for, render
from metaproxy.firewall.text import WIDTH, comment_block, policy_routing, print_rules
from tests.unit.firewall_fixtures import config


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_text_is_tidy(tmp_path: pathlib.Path, backend: str, strict: bool, mode: str) -> None:
    for unload in (False, True):
        text = render(config(tmp_path, daemon=f"mode = {mode}", dns="127.0.0.1:5353"), backend,
                      strict=strict, unload=unload)
        assert text.endswith("\n") and not text.endswith("\n\n")
        assert not re.search(r"[ \t]+$", text, re.M), "trailing whitespace"
        assert all(len(line) <= 200 for line in text.splitlines())


def test_prose_is_wrapped_into_comments_and_commands_never_are() -> None:
    prose = "word " * 60
    command = "  ip -4 rule add fwmark 0x8675 lookup 8675" + " x" * 60
    block = comment_block([prose, "", command])
    lines = block.splitlines()
    assert all(line.startswith("#") for line in lines)
    assert "#" in lines and f"# {command}" in lines
    assert all(len(line) <= WIDTH + 2 for line in lines if line != f"# {command}")
    assert lines[1].startswith("#   "), "continuation lines are indented"


def test_policy_routing_is_for_tproxy_only_and_says_how_to_undo_it(tmp_path: pathlib.Path) -> None:
    assert policy_routing(plan_for(config(tmp_path), strict=False), (4, 6)) == []
    plan = plan_for(config(tmp_path, daemon="mode = tproxy"), strict=True)
    lines = policy_routing(plan, (4, 6))
    assert "  ip -6 route add local ::/0 dev lo table 8675" in lines
    assert lines.index("and to undo it:") < lines.index("  ip -4 rule del fwmark 0x8675 lookup 8675")
    assert policy_routing(plan, (4,), undo_only=True)[1:] == [
        "  ip -4 rule del fwmark 0x8675 lookup 8675", "  ip -4 route del local 0.0.0.0/0 dev lo table 8675"]


def test_the_header_names_the_command_that_prints_the_same_rules(tmp_path: pathlib.Path) -> None:
    plan = plan_for(config(tmp_path), strict=True)
    assert print_rules("nftables", plan) == "subgraph_metaproxy --print-rules nftables --strict"
    assert print_rules("iptables", plan, unload=True) == "subgraph_metaproxy --print-rules iptables --strict --unload"
