"""Shared by the root-phase modules: running a step, and reading the kernel's verdict.

A step takes effect or raises PrivilegeError naming the step and the errno.
Checks read /proc/self/status, the kernel's own account of the process,
rather than trust the return value of the call that was meant to change it.
"""

from __future__ import annotations

import errno
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

from metaproxy.errors import PrivilegeError

T = TypeVar("T")


def describe(exc: OSError) -> str:
    """'Operation not permitted (errno 1 EPERM)': the text, and the symbol people search for."""
    code = exc.errno or 0
    return f"{os.strerror(code)} (errno {code} {errno.errorcode.get(code, '?')})"


def step(name: str, call: Callable[..., T], *args: object) -> T:
    try:
        return call(*args)
    except OSError as exc:
        raise PrivilegeError(f"privilege step '{name}' failed: {describe(exc)}") from exc


def require_module(name: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise PrivilegeError(f"cannot import {name}: install {package} and run the daemon with "
                             "Debian's /usr/bin/python3") from exc


def status() -> dict[str, str]:
    """/proc/self/status as a dict: {'CapEff': '0000000000000000', 'NoNewPrivs': '1', ...}."""
    with open("/proc/self/status", encoding="ascii") as f:
        return {key: value.strip() for key, _, value in (line.partition(":") for line in f)}


def require_status(name: str, key: str, expected: str) -> None:
    found = status().get(key, "<missing>")
    if found != expected:
        raise PrivilegeError(f"privilege step '{name}' did not take effect: /proc/self/status "
                             f"shows {key} {found}, expected {expected}")


def require_single_thread() -> None:
    """The drop and Landlock change the calling thread only: another would keep root or roam."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise PrivilegeError(f"privilege step 'check threads' failed: {threads} threads are running; "
                             "drop privileges before starting any, or they would stay root")
