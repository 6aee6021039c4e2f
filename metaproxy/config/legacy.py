"""The original program's JSON config, still accepted unchanged.

    {"Relays": [{"destinationport": "80" | "*",
                 "relaytype": "SOCKS5" | "HTTP_CONNECT",
                 "relayip": "127.0.0.1" | "unix:/path",
                 "relayport": "9050"}]}

It becomes the same ``Config`` as the configobj text that ``equivalent_text``
prints, which the daemon logs once so that users can move to the new format.
"""

from __future__ import annotations

import json
from typing import Any

from metaproxy.config.addresses import parse_port, parse_upstream_address
from metaproxy.config.model import (
    PER_CONNECTION, Config, DaemonSettings, RouteTable, UnixAddress, Upstream, UpstreamType,
    default_connect_timeout,
)
from metaproxy.errors import ConfigError

_TYPES = {"SOCKS5": UpstreamType.SOCKS5, "HTTP_CONNECT": UpstreamType.HTTP}
_KEYS = ("destinationport", "relaytype", "relayip", "relayport")


def looks_like_json(text: str) -> bool:
    return text.lstrip().startswith("{")


def load_json(path: str, text: str) -> Config:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([f"{path}:{e.lineno}:{e.colno}: JSON syntax error: {e.msg}"]) from e
    except RecursionError as e:
        # json recurses once per nesting level and gives up with RecursionError.
        raise ConfigError([f"{path}: legacy JSON: expected the original's {{\"Relays\": [...]}} format, "
                           "found nesting deeper than Python's recursion limit"]) from e
    except ValueError as e:
        # json.loads raises a bare ValueError for an integer literal longer than
        # sys.get_int_max_str_digits() (4300 digits by default).
        raise ConfigError([f"{path}: legacy JSON: expected ports as short numbers or strings, "
                           "found an integer literal too long to convert"]) from e
    problems: list[str] = []
    relays = data.get("Relays") if isinstance(data, dict) else None
    if not isinstance(relays, list) or not relays:
        raise ConfigError([f"{path}: legacy JSON: expected a non-empty \"Relays\" list, found "
                           f"{'nothing' if relays is None else type(relays).__name__}"])
    upstreams: dict[str, Upstream] = {}
    by_target: dict[tuple[UpstreamType, str], str] = {}
    ports: dict[int, str] = {}
    fallback: str | None = None
    for index, relay in enumerate(relays):
        where = f"{path}: Relays[{index}]"
        upstream = _relay(where, relay, problems)
        if upstream is None:
            continue
        key = (upstream.type, str(upstream.address))
        if key not in by_target:
            name = f"relay{len(by_target) + 1}"
            by_target[key] = name
            upstreams[name] = Upstream(name=name, type=upstream.type, address=upstream.address,
                                       connect_timeout=upstream.connect_timeout, isolation=upstream.isolation)
        name = by_target[key]
        dport = str(relay["destinationport"]).strip()
        if dport == "*":
            fallback = name
            continue
        try:
            port = parse_port(dport)
        except ValueError as e:
            problems.append(f"{where} destinationport: expected a port or \"*\", found {dport!r} ({e})")
            continue
        if port in ports:
            problems.append(f"{where} destinationport: expected each port once, found {port} again")
        ports[port] = name
    if problems:
        raise ConfigError(problems)
    return Config(source=path, daemon=DaemonSettings(), upstreams=upstreams,
                  routes=RouteTable(ports=ports, fallback=fallback), legacy=True)


def _relay(where: str, relay: Any, problems: list[str]) -> Upstream | None:
    if not isinstance(relay, dict):
        problems.append(f"{where}: expected an object, found {type(relay).__name__}")
        return None
    missing = [k for k in _KEYS if k not in relay]
    extra = sorted(set(relay) - set(_KEYS))
    if missing or extra:
        found = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unknown {', '.join(extra)}"] if extra else [])
        problems.append(f"{where}: expected the keys {', '.join(_KEYS)}, found {'; '.join(found)}")
        return None
    kind = _TYPES.get(str(relay["relaytype"]).upper())
    if kind is None:
        problems.append(f"{where} relaytype: expected SOCKS5 or HTTP_CONNECT, found {relay['relaytype']!r}")
        return None
    ip = str(relay["relayip"])
    try:
        if ip.startswith("unix:"):
            address = parse_upstream_address(ip)
        else:
            address = parse_upstream_address(f"[{ip}]:{relay['relayport']}" if ":" in ip
                                             else f"{ip}:{relay['relayport']}")
    except ValueError as e:
        problems.append(f"{where} relayip/relayport: expected an IP literal and a port, or unix:/path, found {e}")
        return None
    if isinstance(address, UnixAddress) and kind is not UpstreamType.SOCKS5:
        problems.append(f"{where} relayip: expected ip (unix: works only for SOCKS5), found {ip!r}")
        return None
    # The original gave every SOCKS5 connection fresh credentials: the legacy format keeps
    # isolation = connection, whatever the configobj default; the timeout is the type's.
    return Upstream(name="", type=kind, address=address, connect_timeout=default_connect_timeout(kind),
                    isolation=PER_CONNECTION)


def equivalent_text(config: Config) -> str:
    """The configobj text that means the same as a legacy JSON config."""
    out = ["[upstreams]"]
    for u in config.upstreams.values():
        out += [f"    [[{u.name}]]", f"    type = {u.type.value}", f"    address = {u.address}"]
        if u.type is UpstreamType.SOCKS5:
            out.append(f"    isolation = {u.isolation}")
    out.append("[routes]")
    out += [f"{port} = {name}" for port, name in sorted(config.routes.ports.items())]
    if config.routes.fallback:
        out.append(f"* = {config.routes.fallback}")
    return "\n".join(out) + "\n"
