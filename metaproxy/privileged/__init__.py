"""The root phase: everything the daemon does as root, and the way out of it.

In this order, before a byte is read from the network: bind_listeners(),
drop_privileges() (or restrict_unprivileged()), the first journal record,
restrict_access() (Landlock), load_syscall_filter(). Each takes plain values, and takes full effect or raises
PrivilegeError / StartupError naming the step and the errno. Only
metaproxy.errors is imported from the project (tests/unit/test_architecture.py).
"""

from metaproxy.privileged.identity import drop_privileges, restrict_unprivileged
from metaproxy.privileged.landlock_rules import Contained, restrict_access
from metaproxy.privileged.listeners import bind_listeners
from metaproxy.privileged.syscall_filter import load_syscall_filter

__all__ = ["Contained", "bind_listeners", "drop_privileges", "load_syscall_filter", "restrict_access",
           "restrict_unprivileged"]
