"""The iptables back-end (metaproxy.firewall.iptables): text for iptables-restore --noflush
that leaves the rest of the tables alone and can be undone."""

from __future__ import annotations

import pathlib

from metaproxy.firewall import render
from tests.unit.firewall_fixtures import config


def test_iptables_jumps_are_inserted_first_and_undone_in_reverse(tmp_path: pathlib.Path) -> None:
    cfg = config(tmp_path, daemon="mode = tproxy", dns="127.0.0.1:5353")
    load_text = render(cfg, "iptables", strict=True)
    assert load_text.index("*filter") < load_text.index("*mangle") < load_text.index("*nat")
    assert "-I OUTPUT 1 -j METAPROXY" in load_text and "-I PREROUTING 1 -j METAPROXY_TPROXY" in load_text
    assert "-A OUTPUT" not in load_text
    unload = render(cfg, "iptables", strict=True, unload=True)
    assert unload.index("*nat") < unload.index("*mangle") < unload.index("*filter")
    for chain in ("METAPROXY", "METAPROXY_TPROXY"):
        assert f"-X {chain}\n" in unload
