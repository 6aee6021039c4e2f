"""Where log records go, and which fields they carry.

Under systemd, records go to journald with structured fields; in the
foreground they go to stderr. Our journal handler sends only the fields named
here: the stock JournalHandler forwards every record attribute and the
formatting arguments (CODE_ARGS), which is more than we want to vouch for.
A destination field is added only when destinations are shown (-d).

Under the seccomp filter (why the handler looks the way it does):
1. python3-systemd's ``journal.send`` goes through libsystemd's
   sd_journal_sendv, which opens one AF_UNIX datagram socket on its first
   call and keeps it for every later call. The daemon writes its first
   record before the filter loads, so later records need no socket() at all.
2. Without CODE_FILE/CODE_LINE/CODE_FUNC, ``journal.send`` walks the stack
   with ``traceback.extract_stack``, which stats and opens source files on
   every call. We pass the record's own call site instead: no file access,
   and the journal names the real caller rather than this handler.
3. A datagram larger than the socket's send buffer makes libsystemd fall
   back to memfd_create or a file in /dev/shm, calls the filter need not
   allow. MESSAGE is cut to MAX_MESSAGE bytes so that never happens.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from metaproxy.privacy import destinations_shown

IDENTIFIER = "subgraph_metaproxy"
MAX_MESSAGE = 48 * 1024  # far below an unprivileged socket's send buffer (2 x wmem_max, 416 KiB by default)
TRUNCATED = " [truncated]"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
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
                    fields[field] = f"{value:.3f}" if isinstance(value, float) else str(value)
            dest = record.__dict__.get("dest")
            if dest is not None and destinations_shown():
                fields["METAPROXY_DESTINATION"] = str(dest)
            self._send(_cut(self.format(record)), CODE_FILE=record.pathname, CODE_LINE=record.lineno,
                       CODE_FUNC=record.funcName, **fields)
        except Exception:  # logging must never take the daemon down
            self.handleError(record)


def internal_error(exc: BaseException, limit: int = 8) -> str:
    """An unexpected exception as its type and the innermost frames: file, line, function.

    Never its message or its locals: either may quote a destination. The frames
    come from the traceback's code objects, so no source file is opened (the
    sandbox may not allow it, and it is not needed to find the bug).
    """
    frames = [(tb.tb_frame.f_code.co_filename, tb.tb_lineno, tb.tb_frame.f_code.co_name)
              for tb in _walk(exc.__traceback__)][-limit:]
    where = " <- ".join(f"{_short(path)}:{line} in {func}" for path, line, func in reversed(frames))
    return f"{type(exc).__name__}" + (f" at {where}" if where else "")


def _walk(tb: Any) -> list[Any]:
    out = []
    while tb is not None:
        out.append(tb)
        tb = tb.tb_next
    return out


def _short(path: str) -> str:
    """metaproxy/relay/server.py rather than where the package happens to be installed."""
    cut = path.rfind("/metaproxy/")
    return path[cut + 1:] if cut >= 0 else path


def _cut(message: str) -> str:
    """At most MAX_MESSAGE bytes of UTF-8, marked when cut (see 3. above)."""
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_MESSAGE:
        return message
    keep = MAX_MESSAGE - len(TRUNCATED)
    return data[:keep].decode("utf-8", "ignore") + TRUNCATED


def journal_wanted(target: str) -> bool:
    """``auto``: journald when systemd started us, else stderr.

    Started by systemd means either stderr is the journal stream it gave us
    (JOURNAL_STREAM names stderr's device and inode), or the unit sends
    stderr elsewhere but the service has an INVOCATION_ID and the journal
    socket exists. In the foreground (no INVOCATION_ID) logs go to stderr.
    """
    if target != "auto":
        return target == "journal"
    stream = os.environ.get("JOURNAL_STREAM", "")
    if stream:
        try:
            st = os.fstat(sys.stderr.fileno())
        except (OSError, ValueError):
            st = None
        if st is not None and stream == f"{st.st_dev}:{st.st_ino}":
            return True
    return bool(os.environ.get("INVOCATION_ID")) and os.path.exists(JOURNAL_SOCKET)


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
