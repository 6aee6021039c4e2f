"""The error types (metaproxy.errors): each subclasses its built-in and carries its exit code.

Callers may catch either the project's type or the built-in, and cli.main turns
an error into the sysexits.h code that systemd and scripts understand.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from metaproxy import errors

# Each error, the built-in it must also be, and the exit code it carries.
EXPECTED = {
    errors.MetaproxyError: (Exception, errors.EX_SOFTWARE),
    errors.ConfigError: (ValueError, errors.EX_CONFIG),
    errors.PrivilegeError: (PermissionError, errors.EX_NOPERM),
    errors.StartupError: (OSError, errors.EX_OSERR),
    errors.UpstreamError: (ConnectionError, errors.EX_SOFTWARE),
    errors.UpstreamTimeout: (TimeoutError, errors.EX_SOFTWARE),
    errors.UpstreamProtocolError: (ConnectionError, errors.EX_SOFTWARE),
    errors.UpstreamRefused: (ConnectionError, errors.EX_SOFTWARE),
    errors.DestinationUnknown: (OSError, errors.EX_SOFTWARE),
}


def test_every_error_in_the_module_is_listed_here() -> None:
    """A new error type gets its built-in and exit code pinned below."""
    defined = {name for name, value in vars(errors).items()
               if isinstance(value, type) and issubclass(value, errors.MetaproxyError)}
    assert defined == {cls.__name__ for cls in EXPECTED}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda cls: cls.__name__)
def test_each_error_is_its_built_in_and_carries_its_exit_code(cls: type[errors.MetaproxyError]) -> None:
    builtin, code = EXPECTED[cls]
    assert issubclass(cls, errors.MetaproxyError) and issubclass(cls, builtin)
    assert cls.exit_code == code


def test_the_exit_codes_are_sysexits() -> None:
    assert (errors.EX_USAGE, errors.EX_SOFTWARE, errors.EX_OSERR, errors.EX_NOPERM, errors.EX_CONFIG) == \
        (64, 70, 71, 77, 78)


def test_a_config_error_keeps_one_line_per_problem() -> None:
    error = errors.ConfigError(["a.conf: [daemon] port: expected 1-65535, found 0", "a.conf: [x] y: z"])
    assert error.problems[1] == "a.conf: [x] y: z" and str(error).count("\n") == 1


def test_a_refusal_keeps_its_reply_code() -> None:
    error = errors.UpstreamRefused("upstream tor refused CONNECT: host unreachable (0x04)", 0x04)
    assert error.code == 0x04 and "0x04" in str(error)


def test_the_module_imports_nothing_from_the_project() -> None:
    """metaproxy.privileged may import it, so it must not pull in the rest."""
    tree = ast.parse(Path(errors.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if m.startswith("metaproxy")], imported
