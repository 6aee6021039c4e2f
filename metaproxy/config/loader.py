"""Load a config file (configobj, or the original's JSON) into a ``Config``.

Every mistake found is collected, so that ``-t`` can print all of them at once,
one line each: file, line, section, key, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import stat
from typing import Any

import configobj
import validate

from metaproxy.config import legacy
from metaproxy.config import syntax
from metaproxy.config.addresses import (
    INTERFACE_RULE, USER_NAME_RULE, is_interface, is_user_name, parse_inet, parse_listen_ip, parse_port,
    parse_upstream_address,
)
from metaproxy.config.lines import LineIndex
from metaproxy.config.model import (
    Config, DaemonSettings, FirewallSettings, InetAddress, Isolation, IsolationRule, PortRange, RedirectMode,
    RouteTable, SeccompAction, UnixAddress, Upstream, UpstreamType, default_connect_timeout,
)
from metaproxy.config.spec import CONFIGSPEC, EXPECTED
from metaproxy.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20


def load(path: str) -> Config:
    """Read and validate ``path``. Raises ConfigError listing every problem."""
    raw = read_regular_file(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: byte {e.start}: expected UTF-8 text, found byte 0x{raw[e.start]:02x}"]) from e
    if legacy.looks_like_json(text):
        return legacy.load_json(path, text)
    return parse_configobj(path, text)


def read_regular_file(path: str) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most MAX_CONFIG_BYTES.

    1. ``os.stat`` first: a FIFO, a device or a directory is refused before it
       is opened at all, because opening one may block (a FIFO waits for a
       writer) or act on the device.
    2. Then ``O_NONBLOCK`` and ``fstat`` on what was actually opened, in case
       the path was replaced between the two calls: the open cannot block,
       and a non-regular file is still refused.
    """
    try:
        _require_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file: {e.strerror}"]) from e
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        chunks, size = [], 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file: {e.strerror}"]) from e
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: the config file is larger than {MAX_CONFIG_BYTES} bytes"])
    return b"".join(chunks)


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
)


def _require_regular(path: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise ConfigError([f"{path}: expected the config as a regular file, found {kind}"])


def parse_configobj(path: str, text: str) -> Config:
    parsed = syntax.parse(text)
    problems = _Problems(path, parsed.lines)
    for line, message in parsed.problems:
        problems.raw(line, f"syntax error: {message}")
    if problems.items:
        raise ConfigError(problems.items)
    # The tree is already parsed: ConfigObj only applies the configspec to it.
    obj = configobj.ConfigObj(parsed.tree, configspec=CONFIGSPEC.splitlines(), interpolation=False)

    # A key where a section belongs ("upstreams = x") would reach the code
    # below as a string: say so, and stop.
    for name in ("daemon", "upstreams", "routes", "firewall"):
        if name in obj and not isinstance(obj[name], dict):
            problems.add((), name, f"a [{name}] section", f"a key {name!r}")
    if problems.items:
        raise ConfigError(problems.items)
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
    for name, section in obj["upstreams"].items():
        if isinstance(section, dict) and isinstance(section.get("isolation"), list):
            _isolation(("upstreams", name), section, problems)
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
        groups=tuple(dict.fromkeys(d["groups"])),
        max_connections=d["max_connections"], idle_timeout=d["idle_timeout"],
        connect_timeout=d["connect_timeout"], drain_timeout=d["drain_timeout"],
        log_destinations=d["log_destinations"], log_connections=d["log_connections"],
        log_refusals=d["log_refusals"],
        seccomp=SeccompAction(d["seccomp"]),
    )
    _user_name(("daemon",), "user", d["user"], problems)
    for group in daemon.groups:
        # Whether each exists is -t's check (metaproxy.checks): /etc/group is out of the sandbox on reload.
        if not is_user_name(group) or group.isdigit():
            problems.add(("daemon",), "groups", GROUP_NAME_RULE, repr(group))
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
    for user in obj["firewall"]["exempt_users"]:
        _user_name(("firewall",), "exempt_users", user, problems)
    lan = tuple(dict.fromkeys(obj["firewall"]["lan_interfaces"]))
    _gateway(lan, daemon, problems)
    virtual = _tor_virtual_networks(obj["firewall"]["tor_virtual_networks"], daemon, upstreams, dns, problems)
    if problems.items:
        raise ConfigError(problems.items)
    return Config(source=path, daemon=daemon, upstreams=upstreams, routes=routes, lines=problems.lines,
                  firewall=FirewallSettings(dns=dns, exempt_users=tuple(obj["firewall"]["exempt_users"]),
                                            lan_interfaces=lan, tor_virtual_networks=virtual))


def _tor_virtual_networks(texts: list[str], daemon: DaemonSettings, upstreams: dict[str, Upstream],
                          dns: InetAddress | None, problems: "_Problems") -> tuple[str, ...]:
    """Tor's virtual ranges: networks, and none that holds an address this file names.

    ``tor_virtual_networks =`` (empty) turns the diversion off. A network with
    host bits set is refused rather than widened: it is pasted into rules as
    written, and Tor's VirtualAddrNetwork* lines must name the same range. No
    real host lives in Tor's virtual range, so an upstream, a resolver or a
    listening address inside it is a mistake (its TCP would be diverted).
    """
    where, key = ("firewall",), "tor_virtual_networks"
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for text in (t.strip() for t in texts):
        if not text:
            continue
        try:
            net = ipaddress.ip_network(text)
        except ValueError as e:
            problems.add(where, key, EXPECTED[key], f"{text!r} ({e})")
            continue
        if net.prefixlen == 0:
            problems.add(where, key, "a network narrower than /0 (Tor's default is 10.192.0.0/10)", repr(text))
            continue
        if net not in nets:
            nets.append(net)
    # Each address is reported at its own line, where the mistake usually is.
    named: list[tuple[tuple[str, ...], str, str]] = [
        (("daemon",), "listen", ip) for ip in daemon.listen if not ipaddress.ip_address(ip).is_unspecified]
    named += [(("upstreams", name), "address", u.address.host) for name, u in upstreams.items()
              if isinstance(u.address, InetAddress)]
    named += [(where, "dns", dns.host)] if dns is not None else []
    for sections, item, host in named:
        ip = ipaddress.ip_address(host)
        inside = next((n for n in nets if ip in n), None)
        if inside is not None:
            problems.add(sections, item, f"an address outside [firewall] tor_virtual_networks ({inside}): "
                         "Tor's virtual addresses are never real hosts, and TCP to them is diverted to "
                         "the daemon; use another address, or narrow tor_virtual_networks", host)
    return tuple(str(n) for n in nets)


def _gateway(lan: tuple[str, ...], daemon: DaemonSettings, problems: "_Problems") -> None:
    """Gateway mode: names the rules can carry, and a listener that LAN clients can reach.

    Under REDIRECT, PREROUTING rewrites a LAN client's connection to the
    address of the interface it arrived on: a daemon listening on loopback
    only would never see it (and DNAT to 127.0.0.1 from outside needs
    route_localnet, which the rules do not ask for). TPROXY hands the packet
    to the listening socket whatever its address, so loopback is enough.
    """
    for name in lan:
        if not is_interface(name):
            problems.add(("firewall",), "lan_interfaces", INTERFACE_RULE, repr(name))
    if lan and daemon.mode is RedirectMode.REDIRECT and daemon.listen and \
            all(ipaddress.ip_address(ip).is_loopback for ip in daemon.listen):
        problems.add(("daemon",), "listen",
                     "an address LAN clients reach (the gateway's address on [firewall] lan_interfaces, "
                     "or 0.0.0.0 / ::), since lan_interfaces is set and mode is redirect",
                     repr(", ".join(daemon.listen)))


def _user_name(where: tuple[str, ...], key: str, name: str, problems: "_Problems") -> None:
    """The firewall pastes these names into rules (``--uid-owner``), so -t checks them as it will."""
    if not is_user_name(name):
        problems.add(where, key, USER_NAME_RULE, repr(name))


GROUP_NAME_RULE = "a group name (letters, digits, '_', '.', '-', at most 32 of them, not all digits)"


def _isolation(where: tuple[str, ...], s: Any, problems: "_Problems | None" = None) -> IsolationRule:
    """``user, destination``: units combined; connection and none only alone (and never rotate).

    Checked with the configspec's own checks (``problems`` given), so that -t
    lists a wrong isolation with every other mistake; built later without it.
    """
    units: set[Isolation] = set()
    for text in s["isolation"]:
        try:
            units.add(Isolation(text.strip()))
        except ValueError:
            if problems is not None:
                problems.add(where, "isolation", EXPECTED["isolation"], repr(text))
    alone = units & {Isolation.CONNECTION, Isolation.NONE}
    if problems is not None and alone and len(units) > 1:
        problems.add(where, "isolation", f"{next(iter(alone)).value} alone (it cannot combine with another unit)",
                     repr(", ".join(s["isolation"])))
    if problems is not None and not s["isolation"]:
        problems.add(where, "isolation", EXPECTED["isolation"], "nothing")
    return IsolationRule(frozenset(units), 0 if alone else s["isolation_period"])


def _upstream(name: str, s: Any, default_timeout: float | None, problems: "_Problems") -> Upstream | None:
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
    if s["username"] and not s["password"] and kind in (UpstreamType.SOCKS5, UpstreamType.HTTP):
        # Not a silent "no auth" (and no isolation) on every connection: both or neither.
        problems.add(where, "username", f"a password with it ({kind.value} sends the two together)",
                     "a username without a password")
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
    # The upstream's own key, else an explicit [daemon] connect_timeout, else the type's default.
    timeout = next((t for t in (s["connect_timeout"], default_timeout) if t is not None),
                   default_connect_timeout(kind))
    return Upstream(name=name, type=kind, address=address, username=s["username"],
                    password=s["password"], connect_timeout=timeout,
                    isolation=_isolation(where, s))


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
