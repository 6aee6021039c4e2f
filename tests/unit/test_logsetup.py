"""Which fields our journal records carry, and where logs go.

The handler is tested with a recording stand-in for ``journal.send``; the
system test (tests/system/test_journald.py) reads real records back from a
private systemd-journald.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from metaproxy import logsetup
from tests.unit.forked import require_seccomp, run_forked
from metaproxy.privacy import SCRUBBED, Destination, show_destinations

DEST = Destination("198.51.100.2", 8443)


class Recorder:
    """Stands in for systemd.journal.send: keeps (message, fields) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, message: str, **fields: Any) -> None:
        self.calls.append((message, fields))


@pytest.fixture(autouse=True)
def hidden() -> Iterator[None]:
    show_destinations(False)
    yield
    show_destinations(False)


@pytest.fixture
def sent() -> Iterator[tuple[logging.Logger, Recorder]]:
    handler = logsetup.JournalFieldsHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    recorder = Recorder()
    handler._send = recorder
    logger = logging.getLogger("metaproxy.test_logsetup")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, recorder
    logger.removeHandler(handler)


def close_record(logger: logging.Logger) -> None:
    """A line shaped like the relay's close line."""
    logger.info("cid=%d close (%s) via %s to %s", 7, "eof", "tor", DEST,
                extra={"cid": 7, "upstream": "tor", "dest": DEST, "bytes_up": 120, "bytes_down": 4567,
                       "duration": 0.25, "reason": "eof"})


def test_close_record_carries_identifier_priority_and_connection_fields(sent: Any) -> None:
    logger, recorder = sent
    close_record(logger)
    (message, fields), = recorder.calls
    assert message == f"cid=7 close (eof) via tor to {SCRUBBED}"
    assert fields["SYSLOG_IDENTIFIER"] == "subgraph_metaproxy"
    assert fields["PRIORITY"] == "6"
    assert fields["METAPROXY_CID"] == "7"
    assert fields["METAPROXY_UPSTREAM"] == "tor"
    assert fields["METAPROXY_BYTES_UP"] == "120"
    assert fields["METAPROXY_BYTES_DOWN"] == "4567"
    assert fields["METAPROXY_DURATION"] == "0.250"
    assert fields["METAPROXY_REASON"] == "eof"


def test_no_destination_field_or_text_at_the_default_level(sent: Any) -> None:
    logger, recorder = sent
    close_record(logger)
    (message, fields), = recorder.calls
    assert "METAPROXY_DESTINATION" not in fields
    for text in [message, *map(str, fields.values())]:
        assert "198.51.100.2" not in text and "8443" not in text


def test_destination_field_only_when_destinations_are_shown(sent: Any) -> None:
    logger, recorder = sent
    show_destinations(True)
    close_record(logger)
    (message, fields), = recorder.calls
    assert fields["METAPROXY_DESTINATION"] == "198.51.100.2:8443"
    assert "198.51.100.2:8443" in message


@pytest.mark.parametrize("level, priority", [(logging.DEBUG, "7"), (logging.INFO, "6"),
                                             (logging.WARNING, "4"), (logging.ERROR, "3"),
                                             (logging.CRITICAL, "2")])
def test_priority_follows_the_log_level(sent: Any, level: int, priority: str) -> None:
    logger, recorder = sent
    logger.log(level, "x")
    assert recorder.calls[0][1]["PRIORITY"] == priority


def test_lines_without_connection_fields_carry_none(sent: Any) -> None:
    logger, recorder = sent
    logger.info("listening")
    fields = recorder.calls[0][1]
    assert not [k for k in fields if k.startswith("METAPROXY_")]


def test_code_location_is_the_callers_so_send_never_walks_the_stack(sent: Any) -> None:
    """With CODE_* given, journal.send skips traceback.extract_stack (file access under seccomp)."""
    logger, recorder = sent
    logger.warning("here")
    fields = recorder.calls[0][1]
    assert fields["CODE_FILE"] == __file__
    assert fields["CODE_FUNC"] == "test_code_location_is_the_callers_so_send_never_walks_the_stack"
    assert isinstance(fields["CODE_LINE"], int)


def test_huge_messages_are_cut_to_fit_one_datagram(sent: Any) -> None:
    logger, recorder = sent
    logger.warning("%s", "é" * logsetup.MAX_MESSAGE)
    message = recorder.calls[0][0]
    assert message.endswith(logsetup.TRUNCATED)
    assert len(message.encode()) <= logsetup.MAX_MESSAGE


def test_a_failing_send_does_not_raise(sent: Any) -> None:
    logger, recorder = sent

    def broken(message: str, **fields: Any) -> None:
        raise OSError("journal gone")
    logger.handlers[0]._send = broken
    old, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        logger.info("still fine")
    finally:
        logging.raiseExceptions = old


# ---- where logs go ---------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("JOURNAL_STREAM", "INVOCATION_ID"):
        monkeypatch.delenv(name, raising=False)
    socket_path = tmp_path / "socket"
    monkeypatch.setattr(logsetup, "JOURNAL_SOCKET", str(socket_path))
    return socket_path


def test_explicit_targets_win(clean_env: Path) -> None:
    assert logsetup.journal_wanted("journal")
    assert not logsetup.journal_wanted("stderr")


def test_auto_uses_the_journal_when_stderr_is_the_journal_stream(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logsetup.journal_wanted("auto")
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not logsetup.journal_wanted("auto")


def test_auto_under_systemd_with_stderr_elsewhere_needs_the_socket(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    assert not logsetup.journal_wanted("auto")
    clean_env.touch()
    assert logsetup.journal_wanted("auto")


def test_auto_in_the_foreground_is_stderr_even_with_a_journal(clean_env: Path) -> None:
    clean_env.touch()
    assert not logsetup.journal_wanted("auto")


def test_setup_installs_one_handler_of_the_chosen_kind(clean_env: Path) -> None:
    root = logging.getLogger("metaproxy")
    saved = root.handlers[:], root.level, root.propagate, logging.raiseExceptions
    try:
        logsetup.setup(debug=False, target="stderr")
        assert [type(h) for h in root.handlers] == [logging.StreamHandler]
        assert root.level == logging.INFO
        logsetup.setup(debug=True, target="journal")
        assert [type(h) for h in root.handlers] == [logsetup.JournalFieldsHandler]
        assert root.level == logging.DEBUG
    finally:
        root.handlers[:], root.level, root.propagate, logging.raiseExceptions = saved


# ---- under a seccomp filter ------------------------------------------------------------

def test_records_after_the_first_need_no_socket_or_file_calls() -> None:
    """The first record opens libsystemd's journal socket; later records (a huge one too)
    go out through it with no socket(), open or stat call, which a filter loaded in
    between kills. Runs in a forked child, so a kill does not take the test runner along.
    No journald needs to listen: libsystemd opens the socket either way."""
    seccomp = require_seccomp()

    def body() -> None:
        handler = logsetup.JournalFieldsHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("metaproxy.test_logsetup.sandboxed")
        logger.propagate = False
        logger.addHandler(handler)
        logger.info("first record: opens the socket")
        deny = seccomp.SyscallFilter(seccomp.ALLOW)
        for call in ("socket", "memfd_create", "open", "openat", "stat", "lstat", "newfstatat", "statx"):
            deny.add_rule(seccomp.KILL_PROCESS, call)
        deny.load()  # sets no-new-privs itself (filter_attr CTL_NNP defaults on)
        close_record(logger)
        logger.warning("%s", "x" * (logsetup.MAX_MESSAGE * 4))
    run_forked(body)


def test_internal_error_names_type_and_frames_but_never_the_text() -> None:
    def deep() -> None:
        raise ValueError("cannot reach 198.51.100.2:443 for alice")
    try:
        deep()
    except ValueError as e:
        text = logsetup.internal_error(e)
    assert text.startswith("ValueError at tests/unit/test_logsetup.py:") or text.startswith("ValueError at /"), text
    assert " in deep <- " in text and "test_internal_error_names_type_and_frames" in text
    assert "198.51.100.2" not in text and "alice" not in text and "443" not in text.split(" at ")[0]


def test_loop_errors_are_logged_without_the_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    from metaproxy import daemon
    try:
        raise OSError("upstream for 203.0.113.9:22 failed")
    except OSError as e:
        error = e
    with caplog.at_level(logging.ERROR, logger="metaproxy"):
        daemon._log_loop_error(None, {"message": "exception in a relay callback", "exception": error})  # type: ignore[arg-type]
    (record,) = caplog.records
    assert record.getMessage().startswith("internal error: exception in a relay callback (OSError at ")
    assert "203.0.113.9" not in record.getMessage()

