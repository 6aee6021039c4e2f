"""metaproxy.firewall is pure text generation, layered bottom to top; checked with ast.

The daemon never runs a firewall tool: nothing in the package may do I/O,
start a process or touch a socket. And the back-ends share code only
through the layers below them, so that no import cycle can form.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "metaproxy" / "firewall"

STDLIB_ALLOWED = {"__future__", "dataclasses", "enum", "ipaddress", "re", "textwrap", "typing"}
# module -> the project modules it may import
LAYERS = {
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
FROM_PACKAGE = {"iptables": {"text"}, "nftables": {"text"}, "plan": {"gateway"}, "__init__": {"iptables", "nftables"}}
FORBIDDEN_CALLS = {"open", "exec", "eval", "compile", "__import__", "input", "print"}


def imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
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


def test_every_module_is_in_a_layer() -> None:
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(LAYERS)


def test_modules_import_only_pure_stdlib_and_the_layers_below() -> None:
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for module, names in imports(tree):
            top = module.split(".")[0]
            if top in STDLIB_ALLOWED:
                continue
            if module not in LAYERS[path.stem]:
                problems.append(f"{path.name} imports {module}")
            elif module == "metaproxy.firewall":
                extra = set(names) - FROM_PACKAGE.get(path.stem, set())
                if extra:
                    problems.append(f"{path.name} imports {sorted(extra)} from metaproxy.firewall")
    assert problems == []


def test_no_io_calls() -> None:
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
                problems.append(f"{path.name}:{node.lineno} calls {node.func.id}()")
    assert problems == []
