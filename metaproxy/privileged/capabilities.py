"""Capability sets and the bounding set, through python3-prctl.

Why the order matters:
 1. Removing a capability from the bounding set needs CAP_SETPCAP, so the
    bounding set is narrowed while the process is still root, before setresuid.
 2. setresuid() from root to another uid empties the permitted, effective and
    ambient sets, unless PR_SET_KEEPCAPS is on. It is on only when the caller
    keeps something, and then only until the kept set is in place.
 3. The bounding set does not shrink the permitted set (it limits what a later
    execve() can gain), so both are emptied, and both are checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

from metaproxy.errors import PrivilegeError
from metaproxy.privileged.steps import require_module, require_status, step


def prctl() -> ModuleType:
    return require_module("prctl", "python3-prctl")


def parse(names: Iterable[str]) -> frozenset[int]:
    """'net_admin' or 'CAP_NET_ADMIN' -> 12; an unknown name is an error, never ignored."""
    caps = set()
    for name in names:
        number = getattr(prctl(), "CAP_" + name.upper().removeprefix("CAP_"), None)
        if not isinstance(number, int):
            raise PrivilegeError(f"unknown capability {name!r} in the capabilities to keep")
        caps.add(number)
    return frozenset(caps)


def narrow_bounding_set(keep: frozenset[int]) -> None:
    """Drop all but `keep` from the bounding set, up to the kernel's last capability."""
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        last = int(f.read())
    for cap in sorted(set(range(last + 1)) - keep):
        try:
            step(f"drop capability {cap} from the bounding set", prctl().capbset_drop, cap)
        except ValueError as exc:  # python3-prctl refuses numbers it does not know
            raise PrivilegeError(f"python3-prctl cannot drop capability {cap}, which this kernel "
                                 "has, from the bounding set: upgrade python3-prctl") from exc


def limit_sets(keep: frozenset[int]) -> None:
    """Leave `keep` in the effective and permitted sets, and nothing else anywhere."""
    step("empty the inheritable set", prctl().cap_inheritable.limit)
    step("limit the permitted set", prctl().cap_permitted.limit, *keep)
    step("limit the effective set", prctl().cap_effective.limit, *keep)
    if keep:  # setresuid() cleared the effective set even with PR_SET_KEEPCAPS
        step("raise the kept capabilities", prctl().set_caps, (sorted(keep), prctl().CAP_EFFECTIVE, True))
    step("clear PR_SET_KEEPCAPS", prctl().set_keepcaps, False)


def verify(keep: frozenset[int], *, bounding: bool = True) -> None:
    """Prove from /proc/self/status that only `keep` is left."""
    mask = f"{sum(1 << cap for cap in keep):016x}"
    for key, expected in (("CapInh", "0" * 16), ("CapAmb", "0" * 16), ("CapPrm", mask), ("CapEff", mask)):
        require_status(f"limit {key}", key, expected)
    if bounding:
        require_status("narrow the bounding set", "CapBnd", mask)
