"""The real peers of the lab: upstream proxies in the gateway, destinations in the web.

Gateway (each on GATEWAY4 and GATEWAY6 unless noted):

    port  peer
    1080  dante, no auth            socks5, socks4, socks4a
    1081  dante, socksmethod "pam.username none" (pam_permit: any user/password, or no
          auth at all; like Tor); its log names the username of every connection
    1082  microsocks, no auth       (one process per address family)
    1083  microsocks -u/-P          (one process per address family)
    3128  tinyproxy with BasicAuth  HTTP CONNECT, every port allowed
    3129  tinyproxy without auth    HTTP CONNECT (the legacy JSON format has no credentials)
    3130  squid with Basic auth     HTTP CONNECT to the lab's web ports only; cache.log
          shows each request as squid read it off the wire
    1090  scripted upstream         SOCKS5, SOCKS4, SOCKS4a and HTTP CONNECT on one port; sends
          its reply and the destination's banner in one segment (scripted_upstream.py)
    1998  silent: accepts and never answers
    1999  nothing listens (an upstream that is down)
    unix  socat on a Unix socket, bridging SOCKS5 to dante on 1080

Web (on WEB4 and WEB6):

    nginx on HTTP_PORTS serving index.html and big.bin (50 MB, random)
    SINK_PORT    reads to EOF, replies "<sha256 hex> <length>\\n"
    SILENT_PORT  accepts and never answers
    banner ports speak first ("SSH-2.0-...\\r\\n"), then echo
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tests.system.lab import (GATEWAY4, GATEWAY6, GATEWAY_OUT4, GATEWAY_OUT6, HERE, PYTHON, WEB4, WEB6,
                 Lab, LabError, Namespace, Process)

DANTE_PORT = 1080
DANTE_AUTH_PORT = 1081
MICROSOCKS_PORT = 1082
MICROSOCKS_AUTH_PORT = 1083
TINYPROXY_AUTH_PORT = 3128
TINYPROXY_PORT = 3129
SQUID_PORT = 3130
SCRIPTED_UPSTREAM_PORT = 1090
SILENT_UPSTREAM_PORT = 1998
DOWN_UPSTREAM_PORT = 1999

MICROSOCKS_USER, MICROSOCKS_PASSWORD = "msuser", "mspass"
HTTP_USER, HTTP_PASSWORD = "webuser", "webpass"

SINK_PORT = 9001
SILENT_PORT = 9002
BANNER = b"SSH-2.0-metaproxy-test\r\n"   # what servers.py banner sends first
BIG_SIZE = 50 * 1024 * 1024
INDEX = "<html><body>subgraph_metaproxy lab page</body></html>\n"


@dataclass
class Gateway:
    """What the tests need to know about the upstream proxies."""
    dante_log: Path
    dante_auth_log: Path
    unix_socket: Path
    tinyproxy_log: Path
    squid_access_log: Path
    squid_cache_log: Path
    scripted_upstream: Process
    processes: dict[str, Process] = field(default_factory=dict)


@dataclass
class Web:
    """What the tests need to know about the destinations."""
    http_ports: tuple[int, ...]
    www: Path
    big_sha256: str
    processes: dict[str, Process] = field(default_factory=dict)


# ---- gateway --------------------------------------------------------------------------

def dante_conf(lab: Lab, port: int, method: str, log: Path, extra: str = "", *,
               internal: Iterable[str] = (GATEWAY4, GATEWAY6),
               external: Iterable[str] = (GATEWAY_OUT4, GATEWAY_OUT6),
               socks_log: str = "connect disconnect error") -> str:
    """A danted.conf for CONNECT from anywhere; the bench narrows addresses and logging."""
    internals = "".join(f"internal: {a} port = {port}\n" for a in internal)
    externals = "".join(f"external: {a}\n" for a in external)
    return f"""\
logoutput: {log}
{internals}{externals}clientmethod: none
socksmethod: {method}
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 0/0 to: 0/0
    log: error
}}
socks pass {{
    from: 0/0 to: 0/0
    command: connect
    log: {socks_log}
    {extra}
}}
"""


def start_dante(lab: Lab) -> Process:
    log = lab.tmp / "dante.log"
    conf = lab.file("dante.conf", dante_conf(lab, DANTE_PORT, "none", log))
    process = lab.gateway.spawn("dante", ["danted", "-f", str(conf), "-p", str(lab.tmp / "dante.pid")])
    _wait_both(lab.gateway, DANTE_PORT, process)
    return process


def start_dante_auth(lab: Lab) -> Process:
    """dante with pam.username, accepting any username and password (like Tor).

    The PAM service lives in a private directory that is bind-mounted over
    /etc/pam.d in dante's own mount namespace only, so the host's /etc is
    never touched.
    """
    service = f"{lab.prefix}-dante"
    pamd = lab.tmp / "pam.d"
    pamd.mkdir(exist_ok=True)
    (pamd / service).write_text("auth required pam_permit.so\naccount required pam_permit.so\n"
                                "session required pam_permit.so\n")
    pamd.chmod(0o755)
    log = lab.tmp / "dante-auth.log"
    conf = lab.file("dante-auth.conf",
                    dante_conf(lab, DANTE_AUTH_PORT, "pam.username none", log, f"pam.servicename: {service}"))
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/pam.d && exec "$@"', str(pamd),
            "danted", "-f", str(conf), "-p", str(lab.tmp / "dante-auth.pid")]
    process = lab.gateway.spawn("dante-auth", argv)
    _wait_both(lab.gateway, DANTE_AUTH_PORT, process)
    return process


def start_microsocks(lab: Lab, port: int, auth: bool) -> list[Process]:
    processes = []
    for address in (GATEWAY4, GATEWAY6):
        argv = ["microsocks", "-i", address, "-p", str(port)]
        if auth:
            argv += ["-u", MICROSOCKS_USER, "-P", MICROSOCKS_PASSWORD]
        name = f"microsocks-{port}-{'v6' if ':' in address else 'v4'}"
        process = lab.gateway.spawn(name, argv)
        lab.gateway.wait_tcp(address, port, process=process)
        processes.append(process)
    return processes


def start_tinyproxy(lab: Lab, port: int, auth: bool) -> Process:
    # Without a Listen line tinyproxy binds every address of the gateway (both
    # families); without ConnectPort lines CONNECT is allowed to every port.
    log = lab.tmp / f"tinyproxy-{port}.log"
    log.touch()
    os.chown(log, 65534, 65534)
    lines = [f"Port {port}", "User nobody", "Group nogroup", "Timeout 60", f"LogFile \"{log}\"",
             "LogLevel Connect", "MaxClients 100", "DisableViaHeader Yes"]
    if auth:
        lines.append(f"BasicAuth {HTTP_USER} {HTTP_PASSWORD}")
    conf = lab.file(f"tinyproxy-{port}.conf", "\n".join(lines) + "\n")
    process = lab.gateway.spawn(f"tinyproxy-{port}", ["tinyproxy", "-d", "-c", str(conf)])
    _wait_both(lab.gateway, port, process)
    return process


def crypt_hash(password: str, salt: str = "metaproxylab") -> str:
    """A SHA-512 crypt(3) hash from the system's libcrypt, the one squid's helper calls.

    basic_ncsa_auth compares crypt(password, stored) with the stored hash, so any
    scheme libcrypt knows works; $6$ needs no extra program (openssl, htpasswd).
    """
    libcrypt = ctypes.CDLL("libcrypt.so.1")
    libcrypt.crypt.restype = ctypes.c_char_p
    libcrypt.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    hashed = libcrypt.crypt(password.encode(), f"$6${salt}$".encode())
    if not hashed or not hashed.startswith(b"$6$"):
        raise LabError(f"libcrypt could not make a SHA-512 crypt hash (got {hashed!r})")
    return hashed.decode()


def squid_conf(lab: Lab, directory: Path, htpasswd: Path, connect_ports: Iterable[int]) -> str:
    """squid as a CONNECT-only proxy with Basic auth, all its files in `directory`, no cache."""
    ports = " ".join(str(p) for p in sorted(set(connect_ports)))
    if not ports:
        raise LabError("squid needs the list of web ports it may CONNECT to")
    return f"""\
http_port {GATEWAY4}:{SQUID_PORT}
http_port [{GATEWAY6}]:{SQUID_PORT}
visible_hostname metaproxy-lab-squid
cache_effective_user nobody
cache_effective_group nogroup
pid_filename {directory}/squid.pid
coredump_dir {directory}
cache_log {directory}/cache.log
logformat lab %ts.%03tu %>a user=%un %rm %ru status=%>Hs %Ss
access_log stdio:{directory}/access.log logformat=lab
logfile_rotate 0
# No cache_dir: memory only, and nothing kept.
cache deny all
cache_mem 1 MB
netdb_filename none
pinger_enable off
icp_port 0
htcp_port 0
# The lab never resolves a name; a CONNECT to an IP literal needs no DNS.
dns_nameservers 127.0.0.1
hosts_file none
shutdown_lifetime 0 seconds
max_filedescriptors 1024
# 11,2 writes each request from a client to cache.log as it arrived, request
# line included: the tests read the authority from there.
debug_options ALL,1 11,2
auth_param basic program /usr/lib/squid/basic_ncsa_auth {htpasswd}
auth_param basic children 2 startup=1 idle=1
auth_param basic realm metaproxy-lab
acl CONNECT method CONNECT
acl lab_web_ports port {ports}
acl lab_users proxy_auth REQUIRED
http_access deny !CONNECT
http_access deny !lab_web_ports
http_access allow lab_users
http_access deny all
"""


def start_squid(lab: Lab, connect_ports: Iterable[int]) -> Process:
    """squid in the foreground (-N: no daemon, no SMP kids), killed by its PID like the rest."""
    directory = lab.tmp / "squid"
    directory.mkdir(mode=0o755)
    os.chown(directory, 65534, 65534)
    htpasswd = lab.file("squid.htpasswd", f"{HTTP_USER}:{crypt_hash(HTTP_PASSWORD)}\n", mode=0o644)
    conf = lab.file("squid.conf", squid_conf(lab, directory, htpasswd, connect_ports))
    process = lab.gateway.spawn("squid", ["squid", "-N", "-f", str(conf)])
    _wait_both(lab.gateway, SQUID_PORT, process)
    return process


def start_scripted_upstream(lab: Lab) -> Process:
    process = lab.gateway.spawn("scripted-upstream", [PYTHON, str(HERE / "scripted_upstream.py"),
                                                      str(SCRIPTED_UPSTREAM_PORT), GATEWAY4, GATEWAY6])
    _wait_both(lab.gateway, SCRIPTED_UPSTREAM_PORT, process)
    return process


def start_unix_socks(lab: Lab) -> tuple[Process, Path]:
    """A SOCKS5 server on a Unix socket: socat bridging to dante (any namespace sees the path)."""
    path = lab.tmp / "socks.sock"
    process = lab.gateway.spawn("unix-socks", [
        "socat", f"UNIX-LISTEN:{path},fork,mode=0666,unlink-early", f"TCP:{GATEWAY4}:{DANTE_PORT}"])
    _wait_path(lab.gateway, path, process)
    return process, path


def start_silent(lab: Lab, ns: Namespace, name: str, port: int, addresses: Iterable[str]) -> Process:
    addresses = list(addresses)
    process = ns.spawn(name, [PYTHON, str(HERE / "servers.py"), "silent", str(port), *addresses])
    for address in addresses:
        ns.wait_tcp(address, port, process=process)
    return process


def start_gateway(lab: Lab, web_ports: Iterable[int]) -> Gateway:
    """Every upstream; squid may CONNECT to `web_ports` only."""
    processes: dict[str, Process] = {}
    processes["dante"] = start_dante(lab)
    processes["dante-auth"] = start_dante_auth(lab)
    for process in start_microsocks(lab, MICROSOCKS_PORT, auth=False):
        processes[process.name] = process
    for process in start_microsocks(lab, MICROSOCKS_AUTH_PORT, auth=True):
        processes[process.name] = process
    processes["tinyproxy-auth"] = start_tinyproxy(lab, TINYPROXY_AUTH_PORT, auth=True)
    processes["tinyproxy"] = start_tinyproxy(lab, TINYPROXY_PORT, auth=False)
    processes["squid"] = start_squid(lab, web_ports)
    processes["scripted-upstream"] = start_scripted_upstream(lab)
    processes["unix-socks"], path = start_unix_socks(lab)
    processes["silent-upstream"] = start_silent(lab, lab.gateway, "silent-upstream",
                                                SILENT_UPSTREAM_PORT, (GATEWAY4, GATEWAY6))
    return Gateway(dante_log=lab.tmp / "dante.log", dante_auth_log=lab.tmp / "dante-auth.log",
                   unix_socket=path, tinyproxy_log=lab.tmp / f"tinyproxy-{TINYPROXY_AUTH_PORT}.log",
                   squid_access_log=lab.tmp / "squid" / "access.log",
                   squid_cache_log=lab.tmp / "squid" / "cache.log",
                   scripted_upstream=processes["scripted-upstream"], processes=processes)


# ---- web ------------------------------------------------------------------------------

def _write_big(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for _ in range(BIG_SIZE // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            out.write(chunk)
    path.chmod(0o644)
    return digest.hexdigest()


def start_nginx(lab: Lab, ports: Iterable[int]) -> tuple[Process, Path, str]:
    www = lab.tmp / "www"
    www.mkdir(mode=0o755)
    (www / "index.html").write_text(INDEX)
    (www / "index.html").chmod(0o644)
    big_sha256 = _write_big(www / "big.bin")
    run_dir = lab.tmp / "nginx"
    run_dir.mkdir(mode=0o755)
    listens = "\n".join(f"        listen {WEB4}:{p};\n        listen [{WEB6}]:{p};" for p in ports)
    conf = lab.file("nginx.conf", f"""\
daemon off;
master_process on;
worker_processes 1;
user nobody nogroup;
pid {run_dir}/nginx.pid;
error_log {run_dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {run_dir}/access.log;
    client_body_temp_path {run_dir}/body;
    proxy_temp_path {run_dir}/proxy;
    fastcgi_temp_path {run_dir}/fastcgi;
    uwsgi_temp_path {run_dir}/uwsgi;
    scgi_temp_path {run_dir}/scgi;
    default_type application/octet-stream;
    server {{
{listens}
        root {www};
    }}
}}
""")
    process = lab.web.spawn("nginx", ["nginx", "-c", str(conf), "-p", str(run_dir), "-e", f"{run_dir}/error.log"])
    for port in ports:
        _wait_both(lab.web, port, process, WEB4, WEB6)
    return process, www, big_sha256


def start_web(lab: Lab, http_ports: Iterable[int], banner_ports: Iterable[int] = ()) -> Web:
    http_ports, banner_ports = tuple(http_ports), tuple(banner_ports)
    processes: dict[str, Process] = {}
    processes["nginx"], www, big_sha256 = start_nginx(lab, http_ports)
    processes["sink"] = lab.web.spawn("sink", [PYTHON, str(HERE / "servers.py"), "sink", str(SINK_PORT), WEB4, WEB6])
    _wait_both(lab.web, SINK_PORT, processes["sink"], WEB4, WEB6)
    processes["silent"] = start_silent(lab, lab.web, "silent-web", SILENT_PORT, (WEB4, WEB6))
    if banner_ports:
        processes["banner"] = lab.web.spawn("banner", [PYTHON, str(HERE / "servers.py"), "banner",
                                                       ",".join(map(str, banner_ports)), WEB4, WEB6])
        for port in banner_ports:
            _wait_both(lab.web, port, processes["banner"], WEB4, WEB6)
    return Web(http_ports=http_ports, www=www, big_sha256=big_sha256, processes=processes)


@dataclass
class World:
    """The lab with its peers running: what a test needs to reach them."""
    lab: Lab
    gateway: Gateway
    web: Web

    @property
    def client(self) -> Namespace:
        return self.lab.client


# ---- readiness ------------------------------------------------------------------------

def _wait_both(ns: Namespace, port: int, process: Process,
               v4: str = GATEWAY4, v6: str = GATEWAY6) -> None:
    ns.wait_tcp(v4, port, process=process)
    ns.wait_tcp(v6, port, process=process)


def _wait_path(ns: Namespace, path: Path, process: Process, timeout: float = 10) -> None:
    import socket
    import time
    for _ in range(int(timeout / 0.05)):
        if not process.alive():
            raise LabError(f"{process.name} exited before creating {path}:\n{process.output()}")
        if path.exists():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.settimeout(1)
                probe.connect(str(path))
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    raise LabError(f"{process.name} did not listen on {path} in {timeout}s:\n{process.output()}")
