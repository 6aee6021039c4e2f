"""Capability sets and the bounding set, through python3-prctl.

Why the order matters:
 1. Removing a capability from the bounding set needs CAP_SETPCAP, so the
    bounding set is emptied while the process is still root, before setresuid.
 2. setresuid() from root to another uid empties the permitted, effective and
    ambient sets (PR_SET_KEEPCAPS is never set); they are emptied again
    explicitly, and read back, rather than trusted to that rule.
 3. The bounding set does not shrink the permitted set (it limits what a later
    execve() can gain), so both are emptied, and both are checked.
"""

from __future__ import annotations

from types import ModuleType

from metaproxy.errors import PrivilegeError
from metaproxy.privileged.steps import require_module, require_status, status, step


def prctl() -> ModuleType:
    return require_module("prctl", "python3-prctl")


def empty_bounding_set() -> None:
    """Drop every capability the bounding set holds, as /proc/self/status lists it.

    Not /proc/sys/kernel/cap_last_cap: the unit's ProcSubset=pid hides /proc/sys,
    and the set itself is what has to be emptied (verify_empty reads it back).
    """
    held = int(status().get("CapBnd", "0"), 16)
    for cap in (c for c in range(64) if held >> c & 1):
        try:
            step(f"drop capability {cap} from the bounding set", prctl().capbset_drop, cap)
        except ValueError as exc:  # python3-prctl refuses numbers it does not know
            raise PrivilegeError(f"python3-prctl cannot drop capability {cap}, which this kernel "
                                 "has, from the bounding set: upgrade python3-prctl") from exc


def empty_sets() -> None:
    """Empty the inheritable, permitted and effective sets (the ambient set follows)."""
    step("empty the inheritable set", prctl().cap_inheritable.limit)
    step("empty the permitted set", prctl().cap_permitted.limit)
    step("empty the effective set", prctl().cap_effective.limit)


def verify_empty(*, bounding: bool = True) -> None:
    """Prove from /proc/self/status that no capability is left."""
    keys = ("CapInh", "CapAmb", "CapPrm", "CapEff") + (("CapBnd",) if bounding else ())
    for key in keys:
        require_status(f"empty {key}", key, "0" * 16)
