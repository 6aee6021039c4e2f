"""Load a config file (configobj, or the original's JSON) into a ``Config``.

Every mistake found is collected, so that ``-t`` can print all of them at once,
one line each: file, line, section, key, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import configobj
import validate

from metaproxy.config import legacy
from metaproxy.config.addresses import parse_inet, parse_listen_ip, parse_port, parse_upstream_address
from metaproxy.config.lines import LineIndex
from metaproxy.config.model import (
    Config, DaemonSettings, FirewallSettings, Isolation, PortRange, RedirectMode,
    RouteTable, SeccompAction, UnixAddress, Upstream, UpstreamType,
)
from metaproxy.config.spec import CONFIGSPEC, EXPECTED
from metaproxy.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20


def load(path: str) -> Config:
    """Read and validate ``path``. Raises ConfigError listing every problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file: {e.strerror}"]) from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: the config file is larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: byte {e.start}: expected UTF-8 text, found byte 0x{raw[e.start]:02x}"]) from e
    if legacy.looks_like_json(text):
        return legacy.load_json(path, text)
    return parse_configobj(path, text)


def parse_configobj(path: str, text: str) -> Config:
    lines = LineIndex(text)
    problems = _Problems(path, lines)
    try:
        obj = configobj.ConfigObj(text.splitlines(), configspec=CONFIGSPEC.splitlines(),
                                  interpolation=False, list_values=True, file_error=True,
                                  raise_errors=False)
    except configobj.ConfigObjError as e:
        for err in getattr(e, "errors", []) or [e]:
            line = getattr(err, "line_number", None)
            problems.raw(line, f"syntax error: {_configobj_message(err)}")
        raise ConfigError(problems.items) from e

    result = obj.validate(validate.Validator({"string_list": _string_list}), preserve_errors=True)
    for sections, key, error in configobj.flatten_errors(obj, result):
        if key is None:
            problems.add(tuple(sections), None, "a section", "nothing")
            continue
        found = _found(obj, sections, key)
        problems.add(tuple(sections), key, EXPECTED.get(key, "a valid value"), found)
    for sections, name in configobj.get_extra_values(obj):
        if tuple(sections) == ("routes",) or (len(sections) == 1 and sections[0] == "upstreams"):
            continue  # route keys are free-form; upstreams must be [[subsections]], checked below
        what = "section" if isinstance(_section(obj, sections).get(name), dict) else "key"
        problems.add(tuple(sections), name, "a known " + what, f"unknown {what} {name!r}")
    if problems.items:
        raise ConfigError(problems.items)
    return _build(path, obj, problems)


def _build(path: str, obj: Any, problems: "_Problems") -> Config:
    d = obj["daemon"]
    listen = []
    # "listen = ," is an empty list: it would bind nothing.
    if not d["listen"]:
        problems.add(("daemon",), "listen", EXPECTED["listen"], "no address")
    for ip in d["listen"]:
        try:
            listen.append(parse_listen_ip(ip))
        except ValueError as e:
            problems.add(("daemon",), "listen", EXPECTED["listen"], str(e))
    daemon = DaemonSettings(
        listen=tuple(listen), port=d["port"], mode=RedirectMode(d["mode"]), user=d["user"],
        max_connections=d["max_connections"], idle_timeout=d["idle_timeout"],
        connect_timeout=d["connect_timeout"], drain_timeout=d["drain_timeout"],
        log_destinations=d["log_destinations"], seccomp=SeccompAction(d["seccomp"]),
    )
    upstreams = {}
    for name, section in obj["upstreams"].items():
        if not isinstance(section, dict):
            problems.add(("upstreams",), name, "an upstream as a [[subsection]]", f"a plain key {name!r}")
            continue
        upstream = _upstream(name, section, daemon.connect_timeout, problems)
        if upstream is not None:
            upstreams[name] = upstream
    # A route to an upstream that is defined but broken is not a second mistake.
    routes = _routes(obj["routes"], set(obj["upstreams"]), problems)
    dns = None
    if obj["firewall"]["dns"]:
        try:
            dns = parse_inet(obj["firewall"]["dns"])
        except ValueError as e:
            problems.add(("firewall",), "dns", EXPECTED["dns"], str(e))
    if problems.items:
        raise ConfigError(problems.items)
    return Config(source=path, daemon=daemon, upstreams=upstreams, routes=routes,
                  firewall=FirewallSettings(dns=dns, exempt_users=tuple(obj["firewall"]["exempt_users"])))


def _upstream(name: str, s: Any, default_timeout: float, problems: "_Problems") -> Upstream | None:
    where = ("upstreams", name)
    kind = UpstreamType(s["type"])
    try:
        address = parse_upstream_address(s["address"])
    except ValueError as e:
        problems.add(where, "address", EXPECTED["address"], str(e))
        return None
    if isinstance(address, UnixAddress) and kind is not UpstreamType.SOCKS5:
        problems.add(where, "address", f"ip:port (unix: works only for socks5, this upstream is {kind.value})",
                     s["address"])
        return None
    if s["password"] and not s["username"]:
        problems.add(where, "username", "a username, since a password is set", "nothing")
    # The handshake would fail on every connection: SOCKS sends credentials as
    # ASCII (python-socks encodes them so), and HTTP Basic joins user:password.
    for key in ("username", "password"):
        if not (s[key].isascii() and s[key].isprintable()):
            # Never echo a password: -t runs as ExecStartPre, into the journal.
            found = repr(s[key]) if key == "username" else "other characters"
            problems.add(where, key, "printable ASCII characters", found)
    if kind is UpstreamType.HTTP and ":" in s["username"]:
        problems.add(where, "username", "no ':' (HTTP Basic auth separates user and password with it)",
                     repr(s["username"]))
    if kind is UpstreamType.SOCKS4 or kind is UpstreamType.SOCKS4A:
        if s["password"]:
            problems.add(where, "password", "no password (SOCKS4 has only a user id)", "a password")
    timeout = s["connect_timeout"] if s["connect_timeout"] is not None else default_timeout
    return Upstream(name=name, type=kind, address=address, username=s["username"],
                    password=s["password"], connect_timeout=timeout,
                    isolation=Isolation(s["isolation"]))


def _routes(section: Any, upstreams: set[str], problems: "_Problems") -> RouteTable:
    ports: dict[int, str] = {}
    ranges: list[PortRange] = []
    fallback = None
    for key, target in section.items():
        if isinstance(target, dict):
            problems.add(("routes",), key, "port = upstream", f"a subsection [[{key}]]")
            continue
        if isinstance(target, list):
            problems.add(("routes",), key, "one upstream name (quote a list of ports on the left)",
                         ", ".join(target))
            continue
        if target not in upstreams:
            known = ", ".join(sorted(upstreams)) or "none"
            problems.add(("routes",), key, f"the name of an upstream ({known})", repr(target))
            continue
        if key.strip() == "*":
            fallback = target
            continue
        for item in key.split(","):
            try:
                _add_route(item.strip(), target, ports, ranges)
            except ValueError as e:
                problems.add(("routes",), key, "a port, a range first-last, a quoted list or *", str(e))
    ranges.sort(key=lambda r: r.first)
    for a, b in zip(ranges, ranges[1:]):
        if b.first <= a.last:
            problems.add(("routes",), str(b), "ranges that do not overlap", f"{b} overlaps {a}")
    return RouteTable(ports=ports, ranges=tuple(ranges), fallback=fallback)


def _add_route(item: str, target: str, ports: dict[int, str], ranges: list[PortRange]) -> None:
    if "-" in item:
        first_text, _, last_text = item.partition("-")
        first, last = parse_port(first_text), parse_port(last_text)
        if first > last:
            raise ValueError(f"the range {item!r} runs backwards")
        ranges.append(PortRange(first, last, target))
        return
    port = parse_port(item)
    if port in ports:
        raise ValueError(f"port {port} is routed twice")
    ports[port] = target


def _string_list(value: Any, min: Any = None, max: Any = None) -> list[str]:
    """validate's string_list, except that one value without a comma is a list of one.

    configobj reads ``listen = 127.0.0.1`` as a string, and the stock check
    rejects a string, so the obvious single-address line was an error.
    """
    if isinstance(value, str):
        value = [value]
    return validate.is_string_list(value, min, max)


def _section(obj: Any, sections: Any) -> Any:
    for s in sections:
        obj = obj[s]
    return obj


def _found(obj: Any, sections: Any, key: str) -> str:
    try:
        value = _section(obj, sections)[key]
    except KeyError:
        return "nothing"
    if isinstance(value, list):
        return repr(", ".join(value))
    return repr(value)


def _configobj_message(err: Exception) -> str:
    msg = str(err)
    # configobj appends ' at line N.'; the line is printed in front already.
    head, sep, _ = msg.partition(' at line "')
    return (head if sep else msg).rstrip(".")


class _Problems:
    def __init__(self, path: str, lines: LineIndex) -> None:
        self.path, self.lines, self.items = path, lines, []  # type: tuple[str, LineIndex, list[str]]

    def add(self, sections: tuple[str, ...], key: str | None, expected: str, found: str) -> None:
        line = self.lines.line(sections, key)
        where = "".join(f"[{s}]" if i == 0 else f"[[{s}]]" for i, s in enumerate(sections)) or "(top)"
        self.items.append(f"{self.path}:{line if line else '?'}: {where} {key or ''}: "
                          f"expected {expected}, found {found}".replace("  ", " "))

    def raw(self, line: int | None, message: str) -> None:
        self.items.append(f"{self.path}:{line if line else '?'}: {message}")


def replace_port(config: Config, port: int) -> Config:
    """``-p`` overrides the listen port."""
    return dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, port=port))
