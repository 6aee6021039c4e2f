"""The structure the design notes promise, read from the source with `ast`.

1. metaproxy/privileged, the root-only code, imports nothing from the project
   but metaproxy.errors, takes plain values rather than the config object, and
   stays small enough to audit (about 640 lines, Landlock's ctypes included).
2. Only metaproxy/privileged imports prctl and seccomp: root-only power stays
   in that one place.
3. The pure modules (protocol logic, config) do no I/O of their own: no asyncio,
   no socket. They can be tested with bytes alone.
4. metaproxy/firewall is pure text generation, layered bottom to top: no I/O
   call, no process, no socket, and each module imports only the pure stdlib
   and the layers below it, so the back-ends share code without a cycle.
5. Tests are found by name: metaproxy/<package>/<module>.py has its unit tests
   in tests/unit/test_<package>_<module>.py (or test_<package>_<module>_*.py),
   a top-level metaproxy/<module>.py in tests/unit/test_<module>.py (or
   test_<module>_*.py), and every tests/unit/test_*.py is named after a module,
   or is one of the few that check the whole tree (tests/README.md). Helpers
   that are not tests (forked.py, firewall_fixtures.py) have no test_ prefix.

A listed directory that disappears fails the test instead of passing it empty.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "metaproxy"
PRIVILEGED = PACKAGE / "privileged"
PRIVILEGED_LINE_BUDGET = 666  # 640, +23 for [daemon] groups kept through the drop, +3 refusing non-amd64
PRIVILEGED_API = {"bind_listeners", "drop_privileges", "restrict_unprivileged", "load_syscall_filter"}
PURE = ("protocol", "config")
IO_MODULES = ("asyncio", "socket")
ROOT_ONLY_LIBRARIES = ("prctl", "_prctl", "seccomp")
FIREWALL = PACKAGE / "firewall"
FIREWALL_STDLIB = {"__future__", "dataclasses", "enum", "ipaddress", "re", "textwrap", "typing"}
# metaproxy/firewall module -> the project modules it may import (its layers below).
FIREWALL_LAYERS = {
    "rules": set(),
    "gateway": {"metaproxy.firewall.rules"},
    "plan": {"metaproxy.firewall", "metaproxy.firewall.rules"},
    "text": {"metaproxy.firewall.rules"},
    "iptables": {"metaproxy.firewall", "metaproxy.firewall.rules"},
    "nftables": {"metaproxy.firewall", "metaproxy.firewall.rules"},
    "__init__": {"metaproxy.config.model", "metaproxy.errors", "metaproxy.firewall",
                 "metaproxy.firewall.plan", "metaproxy.firewall.rules"},
}
# "from metaproxy.firewall import X" is allowed only for these X, per module.
FIREWALL_FROM_PACKAGE = {"iptables": {"text"}, "nftables": {"text"}, "plan": {"gateway"},
                         "__init__": {"iptables", "nftables"}}
FIREWALL_FORBIDDEN_CALLS = {"open", "exec", "eval", "compile", "__import__", "input", "print"}
UNIT_TESTS = ROOT / "tests" / "unit"
NOT_MODULES = ("__init__.py", "__main__.py")
# Unit tests that check the tree as a whole or the test harness, not one module.
WHOLE_TREE_TESTS = {
    "test_architecture.py",  # this file: imports, budgets, names
    "test_docs_in_step.py",  # the man pages, CONTRACTS.md and the shipped config against the code
    "test_forked.py",  # the forked-child harness (tests/unit/forked.py) itself
}


def _modules(directory: Path) -> list[Path]:
    files = sorted(directory.rglob("*.py"))
    if not files:
        pytest.fail(f"{directory.relative_to(ROOT)} has no Python modules: if it moved, update "
                    "tests/unit/test_architecture.py rather than let the check pass on nothing")
    return files


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def _imports(path: Path) -> set[str]:
    """Every module a file imports, absolute: 'from . import x' in metaproxy/a/b.py is metaproxy.a.x."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(path).split(".")
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _is(module: str, names: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def test_privileged_imports_nothing_from_the_project_but_the_error_types() -> None:
    """metaproxy.privileged may import metaproxy.errors and its own modules, nothing else."""
    for path in _modules(PRIVILEGED):
        for module in _imports(path):
            if _is(module, ("metaproxy",)) and module != "metaproxy":
                assert _is(module, ("metaproxy.errors", "metaproxy.privileged")), (
                    f"{path.relative_to(ROOT)} imports {module}: the root-only code must not "
                    "depend on the rest of the project")


def test_privileged_api_takes_plain_values_not_the_config() -> None:
    """The public functions exist as the contract says, and none of their parameters is,
    or is annotated as, a Config."""
    public = {}
    for path in _modules(PRIVILEGED):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name in PRIVILEGED_API:
                public[node.name] = node
    assert set(public) == PRIVILEGED_API, f"missing from metaproxy/privileged: {PRIVILEGED_API - set(public)}"
    for name, node in public.items():
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        for arg in args:
            annotation = ast.unparse(arg.annotation) if arg.annotation else ""
            assert "config" not in (arg.arg + annotation).lower(), (
                f"{name}({arg.arg}: {annotation}) takes the config; pass plain values")


def test_privileged_stays_small_enough_to_audit() -> None:
    """All of metaproxy/privileged together is at most about 660 lines."""
    lines = sum(len(path.read_text().splitlines()) for path in _modules(PRIVILEGED))
    assert lines <= PRIVILEGED_LINE_BUDGET, (
        f"metaproxy/privileged has {lines} lines, over its budget of {PRIVILEGED_LINE_BUDGET}: "
        "move what does not need root out of it")


def test_only_privileged_imports_prctl_and_seccomp() -> None:
    """Changing capabilities or loading filters happens in metaproxy/privileged only."""
    for path in _modules(PACKAGE):
        if PRIVILEGED in path.parents:
            continue
        used = [m for m in _imports(path) if _is(m, ROOT_ONLY_LIBRARIES)]
        assert not used, f"{path.relative_to(ROOT)} imports {used}: that belongs in metaproxy/privileged"


@pytest.mark.parametrize("directory", PURE)
def test_pure_modules_do_no_io(directory: str) -> None:
    """metaproxy/protocol and metaproxy/config import neither asyncio nor socket."""
    for path in _modules(PACKAGE / directory):
        used = [m for m in _imports(path) if _is(m, IO_MODULES)]
        assert not used, f"{path.relative_to(ROOT)} imports {used}: keep I/O out of pure modules"


def _firewall_imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, names) for each import; a relative import is '<relative>', which no layer allows."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append(("<relative>", []))
            else:
                found.append((node.module or "", [alias.name for alias in node.names]))
    return found


def test_every_firewall_module_is_in_a_layer() -> None:
    """A new module of metaproxy/firewall must be given its place in FIREWALL_LAYERS."""
    assert {p.stem for p in _modules(FIREWALL)} == set(FIREWALL_LAYERS)


def test_firewall_modules_import_only_pure_stdlib_and_the_layers_below() -> None:
    problems = []
    for path in _modules(FIREWALL):
        for module, names in _firewall_imports(ast.parse(path.read_text(), str(path))):
            if module.split(".")[0] in FIREWALL_STDLIB:
                continue
            if module not in FIREWALL_LAYERS[path.stem]:
                problems.append(f"{path.name} imports {module}")
            elif module == "metaproxy.firewall":
                extra = set(names) - FIREWALL_FROM_PACKAGE.get(path.stem, set())
                if extra:
                    problems.append(f"{path.name} imports {sorted(extra)} from metaproxy.firewall")
    assert problems == []


def test_firewall_makes_no_io_calls() -> None:
    """The daemon never runs a firewall tool: the package only returns text."""
    problems = []
    for path in _modules(FIREWALL):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in FIREWALL_FORBIDDEN_CALLS):
                problems.append(f"{path.name}:{node.lineno} calls {node.func.id}()")
    assert problems == []


def _test_prefix(module: Path) -> str:
    """metaproxy/relay/server.py -> test_relay_server; metaproxy/cli.py -> test_cli."""
    return "test_" + "_".join(module.relative_to(PACKAGE).with_suffix("").parts)


def _names_module(test: str, prefix: str) -> bool:
    stem = test.removesuffix(".py")
    return stem == prefix or stem.startswith(prefix + "_")


def _code_modules() -> list[Path]:
    return [path for path in _modules(PACKAGE) if path.name not in NOT_MODULES]


def _unit_tests() -> list[str]:
    return sorted(path.name for path in UNIT_TESTS.glob("test_*.py"))


def test_every_module_has_a_unit_test_named_after_it() -> None:
    """metaproxy/<package>/<module>.py is tested in tests/unit/test_<package>_<module>[_*].py,
    metaproxy/<module>.py in tests/unit/test_<module>[_*].py."""
    tests = _unit_tests()
    missing = []
    for module in _code_modules():
        name = str(module.relative_to(PACKAGE))
        prefix = _test_prefix(module)
        found = [t for t in tests if _names_module(t, prefix)]
        if not found:
            missing.append(f"metaproxy/{name} has no unit test: expected tests/unit/{prefix}.py "
                           f"(or {prefix}_*.py)")
    assert not missing, "\n".join(missing)


def test_every_unit_test_is_named_after_a_module() -> None:
    """A test file whose name matches no module would be found by grep only: name it after
    the module it tests, or list it with the whole-tree tests (and say why)."""
    prefixes = [_test_prefix(module) for module in _code_modules()]
    for name in WHOLE_TREE_TESTS:
        assert (UNIT_TESTS / name).exists(), f"tests/unit/{name} is gone: remove it from WHOLE_TREE_TESTS"
    stray = [t for t in _unit_tests()
             if t not in WHOLE_TREE_TESTS and not any(_names_module(t, p) for p in prefixes)]
    assert not stray, (f"tests/unit/{', '.join(stray)} names no module of metaproxy/: rename it "
                       "test_<package>_<module>[_*].py after the module it tests")
