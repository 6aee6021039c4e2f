"""Every system call the seccomp filter names exists on each architecture the package claims.

debian/control's Architecture field is the claim. libseccomp resolves a name
per architecture; a name that does not exist there (arm64 has no epoll_wait,
armhf no mmap or newfstatat, i386 no newfstatat) comes back negative, and a
filter built from it would kill the daemon at its first such call. So the
package says amd64, where the list was read off and checked under load, and
this test fails if the field grows to an architecture, or to `all`, that the
list does not fit.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from metaproxy.privileged.syscall_filter import ALLOWED, DENIED_SOFTLY
from tests.unit.forked import require_seccomp

CONTROL = Path(__file__).resolve().parents[2] / "debian" / "control"
# Debian architecture -> libseccomp's name for it.
SECCOMP_ARCH = {"amd64": "X86_64", "arm64": "AARCH64", "armel": "ARM", "armhf": "ARM", "i386": "X86",
                "ppc64el": "PPC64LE", "riscv64": "RISCV64", "s390x": "S390X", "mips64el": "MIPSEL64"}
# What `all` or `any` would claim: the release architectures of Debian 12 and 13.
RELEASE_ARCHES = sorted(SECCOMP_ARCH)


def claimed_architectures() -> list[str]:
    """The binary package's Architecture field, `all`/`any` spelled out."""
    text = re.sub(r"(?m)^#.*\n", "", CONTROL.read_text(encoding="utf-8"))
    binary = [p for p in re.split(r"\n\s*\n", text) if re.search(r"(?m)^Package:", p)]
    if len(binary) != 1:
        pytest.fail(f"expected one binary paragraph in {CONTROL}, found {len(binary)}", pytrace=False)
    field = re.search(r"(?m)^Architecture:\s*(.+)$", binary[0])
    if field is None:
        pytest.fail(f"{CONTROL}: the binary paragraph has no Architecture field", pytrace=False)
    arches = field.group(1).split()
    return RELEASE_ARCHES if {"all", "any"} & set(arches) else arches


def rule_names() -> set[str]:
    rules = [rule for _purpose, group in ALLOWED for rule in group]
    rules += [rule for _code, group in DENIED_SOFTLY for rule in group]
    return {rule if isinstance(rule, str) else rule[0] for rule in rules}


def unresolved(arch: str) -> list[str]:
    seccomp = require_seccomp()
    token = getattr(seccomp.Arch, SECCOMP_ARCH[arch])
    return sorted(name for name in rule_names() if seccomp.resolve_syscall(token, name) < 0)


@pytest.mark.parametrize("arch", claimed_architectures())
def test_every_rule_name_resolves_on_each_claimed_architecture(arch: str) -> None:
    """libseccomp knows every ALLOWED and DENIED_SOFTLY name on the architectures debian/control names."""
    if arch not in SECCOMP_ARCH:
        pytest.fail(f"debian/control names {arch}, which this test cannot map to libseccomp", pytrace=False)
    missing = unresolved(arch)
    assert not missing, (f"debian/control claims {arch}, where these calls of the filter do not exist: "
                         f"{', '.join(missing)}; narrow Architecture or give the filter that architecture's calls")


def test_architecture_all_would_claim_too_much() -> None:
    """Why the package is not `Architecture: all`: some release architectures lack calls the list names."""
    lacking = {arch: unresolved(arch) for arch in ("arm64", "armhf", "i386")}
    assert all(lacking.values()), lacking
