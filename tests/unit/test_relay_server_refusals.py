"""RefusalLog: refusal lines are rate-limited, and what was held back is counted."""

from __future__ import annotations

import asyncio
import logging

import pytest

from metaproxy.privacy import Destination
from metaproxy.relay.server import RefusalLog


def refused_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "metaproxy.relay"]


def test_at_most_n_lines_per_window_then_one_that_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        limiter = RefusalLog(asyncio.get_running_loop(), 3, window=0.2)
        for cid in range(1, 11):
            limiter.refused(cid, "no route for the destination port", Destination("198.51.100.2", 80))
        await asyncio.sleep(0.35)
        limiter.refused(11, "no route for the destination port", None)
        limiter.close()
    with caplog.at_level(logging.WARNING, logger="metaproxy.relay"):
        asyncio.run(body())
    lines = refused_lines(caplog)
    assert lines[:3] == [f"cid={i} refused: no route for the destination port (to [scrubbed])" for i in (1, 2, 3)]
    assert lines[3] == "7 more refusals in the last 0.2s were not logged (the limit is 3 per 0.2s)"
    assert lines[4] == "cid=11 refused: no route for the destination port"
    assert len(lines) == 5


def test_close_reports_what_was_held_back(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        limiter = RefusalLog(asyncio.get_running_loop(), 1, window=60)
        for cid in range(3):
            limiter.refused(cid, "too many connections (max_connections)", None)
        limiter.close()
    with caplog.at_level(logging.WARNING, logger="metaproxy.relay"):
        asyncio.run(body())
    assert refused_lines(caplog)[-1] == "2 more refusals in the last 60s were not logged (the limit is 1 per 60s)"
