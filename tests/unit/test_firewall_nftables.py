"""The nftables back-end (metaproxy.firewall.nftables): one table inet metaproxy for nft -f,
replaced whole on every load."""

from __future__ import annotations

import pathlib

from metaproxy.firewall import render
from tests.unit.firewall_fixtures import config


def test_nftables_load_and_unload_replace_the_table_idempotently(tmp_path: pathlib.Path) -> None:
    cfg = config(tmp_path)
    replace = "table inet metaproxy\ndelete table inet metaproxy\n"
    assert replace + "\ntable inet metaproxy {\n" in render(cfg, "nftables", strict=True)
    assert render(cfg, "nftables", strict=True, unload=True).endswith(replace)


def test_numeric_uids_are_accepted_and_unquoted_in_nft(tmp_path: pathlib.Path) -> None:
    assert "meta skuid 108 return" in render(config(tmp_path, exempt=["108"]), "nftables", strict=False)
