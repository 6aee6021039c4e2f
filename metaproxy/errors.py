"""Error types shared by every layer, the privileged one included.

Each error names the operation, the object and, where there is one, the remedy.
They also subclass the matching built-in, so callers may catch either.
This module imports nothing from the project: ``metaproxy.privileged`` may use it.
"""

from __future__ import annotations

# sysexits.h: the codes that systemd and scripts understand.
EX_USAGE = 64
EX_CONFIG = 78
EX_OSERR = 71
EX_NOPERM = 77
EX_SOFTWARE = 70


class MetaproxyError(Exception):
    """Base of every error the daemon raises on purpose."""

    exit_code = EX_SOFTWARE


class ConfigError(MetaproxyError, ValueError):
    """The configuration is wrong; ``problems`` holds one line per mistake."""

    exit_code = EX_CONFIG

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class PrivilegeError(MetaproxyError, PermissionError):
    """A step of the root phase failed; the daemon must not go on."""

    exit_code = EX_NOPERM


class StartupError(MetaproxyError, OSError):
    """Binding or another start-up step failed for a reason outside the config."""

    exit_code = EX_OSERR


class UpstreamError(MetaproxyError, ConnectionError):
    """The upstream proxy could not carry a connection.

    The message never contains the destination: callers log it as it is.
    """


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not answer within its connect timeout."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's reply broke its protocol (wrong version, truncated, too large)."""


class UpstreamRefused(UpstreamError):
    """The upstream answered, and refused the CONNECT with a reply code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class DestinationUnknown(MetaproxyError, OSError):
    """The original destination of a redirected connection could not be read."""
