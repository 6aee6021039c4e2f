"""The man pages and the shipped config say what the code does.

Every command-line option of ``metaproxy.cli.build_parser()`` and every key of
the configspec (``metaproxy.config.spec.CONFIGSPEC``) must appear in
subgraph_metaproxy(8), in subgraph_metaproxy.conf(5) and in the shipped
etc/subgraph_metaproxy.conf. Where a page documents a thing (the OPTIONS list,
a key's entry in its section) the check is that it is documented there, with
the type and default that the configspec gives, not merely mentioned.

The pages are mdoc(7) source; this test reads the source, so the package build
needs no formatter to run it.
"""

from __future__ import annotations

import argparse
import pathlib
import re
from typing import Any

import configobj
import pytest
import validate

from metaproxy.cli import build_parser
from metaproxy.config import load
from metaproxy.config.spec import CONFIGSPEC

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAN8 = ROOT / "man/subgraph_metaproxy.8"
MAN5 = ROOT / "man/subgraph_metaproxy.conf.5"
SHIPPED = ROOT / "etc/subgraph_metaproxy.conf"

# configspec section -> the man page section that documents its keys.
MAN5_SECTIONS = {
    "daemon": "THE [daemon] SECTION",
    "upstreams": "THE [upstreams] SECTION",
    "firewall": "THE [firewall] SECTION",
}
# configspec check -> the type's name in subgraph_metaproxy.conf(5).
TYPE_NAMES = {
    "string_list": "string list",
    "integer": "integer",
    "float": "float",
    "option": "option",
    "boolean": "boolean",
    "string": "string",
}


# ---- reading the sources --------------------------------------------------------------

def _read(path: pathlib.Path) -> str:
    if not path.is_file():
        pytest.fail(f"{path.relative_to(ROOT)} is missing", pytrace=False)
    return path.read_text(encoding="utf-8")


def _unescape(roff: str) -> str:
    """mdoc source to the words a reader sees (enough for names and values)."""
    text = roff.replace("\\-", "-").replace("\\(dq", '"').replace("\\&", "")
    # `Fl x` renders as -x; `Fl \-long` (already --long after the line above) as --long.
    text = re.sub(r"\bFl ([\w-]+)", r"-\1", text)
    return text


def _sections(roff: str) -> dict[str, str]:
    """Each ``.Sh`` section's source, by its title."""
    parts: dict[str, str] = {}
    title = ""
    for line in roff.splitlines():
        if line.startswith(".Sh "):
            title = line[4:].strip().strip('"')
            parts[title] = ""
        elif title:
            parts[title] += line + "\n"
    return parts


def _items(section_source: str) -> list[str]:
    """The ``.It`` lines of a section, unescaped."""
    return [_unescape(line) for line in section_source.splitlines() if line.startswith(".It ")]


def _mentions(text: str, word: str) -> bool:
    """``word`` stands alone: not part of a longer option or key."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


# ---- what the code defines ------------------------------------------------------------

def cli_options() -> list[str]:
    parser = build_parser()
    options = [s for action in parser._actions for s in action.option_strings]  # noqa: SLF001
    if not options:
        pytest.fail("metaproxy.cli.build_parser() defines no options", pytrace=False)
    return options


def cli_choices() -> dict[str, list[str]]:
    """Long option -> the values it accepts, for options with choices."""
    found = {}
    for action in build_parser()._actions:  # noqa: SLF001
        if action.choices and not isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            found[action.option_strings[-1]] = [str(c) for c in action.choices]
    return found


def _spec() -> configobj.ConfigObj:
    return configobj.ConfigObj(CONFIGSPEC.splitlines(), list_values=False, _inspec=True)


def spec_keys() -> dict[str, dict[str, str]]:
    """Section -> key -> check text; upstream keys under "upstreams" (their [[__many__]])."""
    spec = _spec()
    keys: dict[str, dict[str, str]] = {}
    for section, body in spec.items():
        if "__many__" in body and isinstance(body["__many__"], dict):
            keys[section] = dict(body["__many__"])
        else:
            keys[section] = {k: v for k, v in body.items() if k != "__many__"}
    return keys


def spec_defaults() -> dict[str, dict[str, Any]]:
    """Section -> key -> default, as validate computes them."""
    text = "[upstreams]\n[[u]]\ntype = socks5\naddress = 127.0.0.1:1\n"
    obj = configobj.ConfigObj(text.splitlines(), configspec=CONFIGSPEC.splitlines())
    if obj.validate(validate.Validator(), copy=True) is not True:
        pytest.fail("the configspec's own defaults do not validate", pytrace=False)
    return {"daemon": dict(obj["daemon"]), "upstreams": dict(obj["upstreams"]["u"]),
            "firewall": dict(obj["firewall"])}


def _type_of(check: str) -> str:
    match = re.match(r"\s*(\w+)", check)
    if match is None or match.group(1) not in TYPE_NAMES:
        pytest.fail(f"unknown configspec check {check!r}: add it to TYPE_NAMES", pytrace=False)
    return TYPE_NAMES[match.group(1)]


def _default_words(value: Any) -> str | None:
    """A default as subgraph_metaproxy.conf(5) spells it (None: see _other_default)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(value) if value else "empty"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value == "":
        return "empty"
    return str(value)


# ---- the tests ------------------------------------------------------------------------

def test_every_option_is_documented_in_the_options_section_of_the_man_page() -> None:
    items = " ".join(_items(_sections(_read(MAN8)).get("OPTIONS", "")))
    missing = [o for o in cli_options() if not _mentions(items, o)]
    assert not missing, f"subgraph_metaproxy.8 OPTIONS lacks an .It entry for: {', '.join(missing)}"


def test_every_choice_of_an_option_is_named_in_its_entry() -> None:
    items = _items(_sections(_read(MAN8)).get("OPTIONS", ""))
    for option, choices in cli_choices().items():
        entry = " ".join(i for i in items if _mentions(i, option))
        missing = [c for c in choices if not _mentions(entry, c)]
        assert not missing, f"subgraph_metaproxy.8: {option} does not list {', '.join(missing)}"


def test_the_synopsis_names_every_option() -> None:
    synopsis = _unescape(_sections(_read(MAN8)).get("SYNOPSIS", ""))
    # Short flags without arguments may be grouped, as in "Op Fl dt": split them.
    synopsis = re.sub(r"(?<![\w-])-([A-Za-z]{2,})(?![\w-])",
                      lambda m: " ".join("-" + c for c in m.group(1)), synopsis)
    parser = build_parser()
    # One spelling per option is enough in a synopsis; the short one when there is one.
    missing = [a.option_strings[0] for a in parser._actions  # noqa: SLF001
               if a.option_strings and not any(_mentions(synopsis, s) for s in a.option_strings)]
    assert not missing, f"subgraph_metaproxy.8 SYNOPSIS lacks: {', '.join(missing)}"


def test_every_option_is_named_in_the_config_man_page() -> None:
    text = _unescape(_read(MAN5))
    missing = [o for o in cli_options() if not _mentions(text, o)]
    assert not missing, f"subgraph_metaproxy.conf.5 does not name: {', '.join(missing)}"


def test_every_option_is_named_in_the_shipped_config() -> None:
    text = _read(SHIPPED)
    missing = [o for o in cli_options() if not _mentions(text, o)]
    assert not missing, ("etc/subgraph_metaproxy.conf does not name these command-line options "
                         f"(in a comment): {', '.join(missing)}")


def test_every_key_has_an_entry_in_its_section_of_the_config_man_page() -> None:
    sections = _sections(_read(MAN5))
    for section, keys in spec_keys().items():
        if section == "routes":
            assert "THE [routes] SECTION" in sections, "subgraph_metaproxy.conf.5 lacks the [routes] section"
            continue
        title = MAN5_SECTIONS.get(section)
        assert title in sections, f"subgraph_metaproxy.conf.5 lacks a section titled {title!r}"
        documented = {i.split()[2] for i in _items(sections[title]) if i.startswith(".It Cm ")}
        missing = sorted(set(keys) - documented)
        assert not missing, f"subgraph_metaproxy.conf.5 {title}: no .It Cm entry for {', '.join(missing)}"


def test_every_key_entry_gives_the_configspec_type_and_default() -> None:
    sections = _sections(_read(MAN5))
    defaults = spec_defaults()
    for section, keys in spec_keys().items():
        if section == "routes":
            continue
        items = {i.split()[2]: i for i in _items(sections[MAN5_SECTIONS[section]]) if i.startswith(".It Cm ")}
        for key, check in keys.items():
            entry = items[key]
            assert _type_of(check) in entry, (
                f"subgraph_metaproxy.conf.5 [{section}] {key}: the entry does not give the type "
                f"{_type_of(check)!r}: {entry}")
            if "default=" not in check:
                assert "required" in entry, f"[{section}] {key} has no default: the entry must say required"
                continue
            words = _default_words(defaults[section][key])
            if words is None:  # connect_timeout: the upstream's falls back to [daemon]'s, then the type's
                assert "connect_timeout" in entry.split("default", 1)[1], entry
                continue
            assert re.search(r"default\s+(Li\s+|Cm\s+)?" + re.escape(words) + r"(\s|$)", entry), (
                f"subgraph_metaproxy.conf.5 [{section}] {key}: expected the default {words!r} in: {entry}")


def test_every_key_is_named_in_the_daemon_man_page() -> None:
    text = _unescape(_read(MAN8))
    missing = [k for keys in spec_keys().values() for k in keys
               if k != "__many__" and not _mentions(text, k)]
    assert not missing, f"subgraph_metaproxy.8 does not name the keys: {', '.join(missing)}"


def test_the_shipped_config_sets_every_key_to_its_default() -> None:
    shipped = configobj.ConfigObj(str(SHIPPED), list_values=True, interpolation=False)
    defaults = spec_defaults()
    text = _read(SHIPPED)
    for section in ("daemon", "firewall"):
        for key, default in defaults[section].items():
            if default is None:  # no value to write ([daemon] connect_timeout: the type decides): a comment
                assert re.search(rf"^#\s*{key}\s*=", text, re.M), f"etc/subgraph_metaproxy.conf: no '# {key} ='"
                continue
            assert key in shipped.get(section, {}), f"etc/subgraph_metaproxy.conf: [{section}] lacks {key}"
    upstreams = shipped.get("upstreams", {})
    assert upstreams, "etc/subgraph_metaproxy.conf has no [[upstream]]"
    for name, body in upstreams.items():
        missing = sorted(set(spec_keys()["upstreams"]) - set(body))
        assert not missing, f"etc/subgraph_metaproxy.conf [[{name}]] does not show {', '.join(missing)}"
    obj = configobj.ConfigObj(str(SHIPPED), configspec=CONFIGSPEC.splitlines(), interpolation=False)
    assert obj.validate(validate.Validator()) is True
    for section in ("daemon", "firewall"):
        for key, default in defaults[section].items():
            if default is None:
                continue
            assert obj[section][key] == default, (
                f"etc/subgraph_metaproxy.conf [{section}] {key} = {obj[section][key]!r}, "
                f"but the configspec default is {default!r} (the file promises defaults)")


def test_the_shipped_config_loads() -> None:
    load(str(SHIPPED))


def _literal_blocks(roff: str, section: str) -> list[str]:
    body = _sections(roff).get(section, "")
    return [_unescape(b) for b in re.findall(r"^\.Bd -literal[^\n]*\n(.*?)^\.Ed$", body, re.M | re.S)]


def test_the_config_examples_in_the_man_page_load(tmp_path: pathlib.Path) -> None:
    roff = _read(MAN5)
    blocks = _literal_blocks(roff, "EXAMPLES") + _literal_blocks(roff, "LEGACY FORMAT")
    assert len(blocks) >= 2, "subgraph_metaproxy.conf.5 should show a configobj and a JSON example"
    for n, block in enumerate(blocks):
        path = tmp_path / f"example{n}.conf"
        path.write_text(block, encoding="utf-8")
        load(str(path))  # raises ConfigError naming the line


def test_every_exit_status_of_the_errors_module_is_documented() -> None:
    from metaproxy import errors
    codes = {v for k, v in vars(errors).items() if k.startswith("EX_") and isinstance(v, int)}
    status = _sections(_read(MAN8)).get("EXIT STATUS", "")
    documented = {int(i.split()[1]) for i in _items(status) if i.split()[1].isdigit()}
    missing = sorted((codes | {0}) - documented)
    assert not missing, f"subgraph_metaproxy.8 EXIT STATUS lacks: {missing}"


def test_every_option_and_choice_is_named_in_the_contracts() -> None:
    """docs/CONTRACTS.md is where the next engineer looks first: it must not fall behind --help."""
    text = _read(ROOT / "docs/CONTRACTS.md")
    missing = [o for o in cli_options() if not _mentions(text, o)]
    missing += [f"{o} {c}" for o, choices in cli_choices().items() for c in choices if not _mentions(text, c)]
    assert not missing, f"docs/CONTRACTS.md does not name: {', '.join(missing)}"
