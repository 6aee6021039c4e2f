"""Where log records go, and which fields they carry.

Under systemd, records go to journald with structured fields; in the
foreground they go to stderr. Our journal handler sends only the fields named
here: the stock JournalHandler forwards every record attribute and the
formatting arguments (CODE_ARGS), which is more than we want to vouch for.
A destination field is added only when destinations are shown (-d).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from metaproxy.privacy import destinations_shown

IDENTIFIER = "subgraph_metaproxy"
_FIELDS = {"cid": "METAPROXY_CID", "upstream": "METAPROXY_UPSTREAM", "bytes_up": "METAPROXY_BYTES_UP",
           "bytes_down": "METAPROXY_BYTES_DOWN", "duration": "METAPROXY_DURATION",
           "reason": "METAPROXY_REASON"}


class JournalFieldsHandler(logging.Handler):
    """Sends MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and our own fields to journald."""

    def __init__(self) -> None:
        super().__init__()
        from systemd import journal  # python3-systemd; imported only when used
        self._send = journal.send
        self._priority = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                          logging.ERROR: 3, logging.CRITICAL: 2}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"PRIORITY": str(self._priority.get(record.levelno, 6)),
                                      "SYSLOG_IDENTIFIER": IDENTIFIER}
            for attr, field in _FIELDS.items():
                value = record.__dict__.get(attr)
                if value is not None:
                    fields[field] = str(value)
            dest = record.__dict__.get("dest")
            if dest is not None and destinations_shown():
                fields["METAPROXY_DESTINATION"] = str(dest)
            self._send(self.format(record), **fields)
        except Exception:  # logging must never take the daemon down
            self.handleError(record)


def journal_wanted(target: str) -> bool:
    """``auto``: journald when stderr is the journal stream systemd gave us."""
    if target != "auto":
        return target == "journal"
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup(debug: bool, target: str = "auto") -> None:
    root = logging.getLogger("metaproxy")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if journal_wanted(target):
        handler = JournalFieldsHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{IDENTIFIER}[%(process)d]: %(levelname)s %(message)s"))
    root.addHandler(handler)
    # Don't let logging print tracebacks (which could quote values) to stderr.
    logging.raiseExceptions = False
