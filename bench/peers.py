"""What runs in the bench's namespaces: the servers, the upstream, the two proxies.

    web      nginx      :80    /small (100 bytes), Connection: close load
             iperf3 -s  :5201  single-stream bulk
             echo       :7     the idle test's end-to-end check
    gateway  danted     192.0.2.2:1080  SOCKS5, no auth; the same upstream for both proxies
    client   metaproxy  127.0.0.1:8675  (python3 -m metaproxy -c FILE, root, drops to nobody)
             redsocks   127.0.0.1:12345 (splice on, its default; drops to nobody)
"""

from __future__ import annotations

import os
from pathlib import Path

from netlab import GATEWAY, GATEWAY_OUT, PROXY_PORTS, PYTHON, Net, Process, clean_env
from tests.system.peers import dante_conf

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SMALL_SIZE = 100
HTTP_PORT, IPERF_PORT, ECHO_PORT, DANTE_PORT = 80, 5201, 7, 1080
MAX_CONNECTIONS = 12000


def start_nginx(net: Net) -> Process:
    www = net.tmp / "www"
    www.mkdir(mode=0o755)
    small = www / "small"
    small.write_bytes(b"x" * (SMALL_SIZE - 1) + b"\n")
    small.chmod(0o644)
    run_dir = net.tmp / "nginx"
    run_dir.mkdir(mode=0o755)
    conf = net.file("nginx.conf", f"""\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
user nobody nogroup;
pid {run_dir}/nginx.pid;
error_log {run_dir}/error.log error;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {run_dir}/body;
    proxy_temp_path {run_dir}/proxy;
    fastcgi_temp_path {run_dir}/fastcgi;
    uwsgi_temp_path {run_dir}/uwsgi;
    scgi_temp_path {run_dir}/scgi;
    default_type application/octet-stream;
    server {{
        listen {HTTP_PORT} backlog=8192;
        root {www};
    }}
}}
""")
    process = net.web.spawn("nginx", ["nginx", "-c", str(conf), "-p", str(run_dir), "-e", f"{run_dir}/error.log"])
    net.wait_listening(net.web, HTTP_PORT, process)
    return process


def start_iperf(net: Net) -> Process:
    process = net.web.spawn("iperf3", ["iperf3", "-s", "-p", str(IPERF_PORT)])
    net.wait_listening(net.web, IPERF_PORT, process)
    return process


def start_echo(net: Net) -> Process:
    process = net.web.spawn("echo", [PYTHON, str(HERE / "echo_server.py"), str(ECHO_PORT)])
    net.wait_listening(net.web, ECHO_PORT, process)
    return process


def start_dante(net: Net) -> Process:
    # The tests' dante, on IPv4 only and logging only errors (not every connection).
    conf = net.file("dante.conf", dante_conf(net, DANTE_PORT, "none", net.tmp / "dante.log", internal=(GATEWAY,),
                                             external=(GATEWAY_OUT,), socks_log="error"))
    process = net.gateway.spawn("danted", ["danted", "-f", str(conf), "-p", str(net.tmp / "dante.pid")])
    net.wait_listening(net.gateway, DANTE_PORT, process)
    return process


def start_redsocks(net: Net) -> Process:
    # log_info on: like metaproxy at its default level, one line per open and close.
    conf = net.file("redsocks.conf", f"""\
base {{
    log_debug = off;
    log_info = on;
    log = "file:{net.tmp}/redsocks-conn.log";
    daemon = off;
    user = nobody;
    group = nogroup;
    redirector = iptables;
    // Its default is RLIMIT_NOFILE / 8 (2,500 here); allow as many as metaproxy
    // (max_connections), so that descriptors, not this setting, are its limit.
    redsocks_conn_max = {MAX_CONNECTIONS};
}}
redsocks {{
    local_ip = 127.0.0.1;
    local_port = {PROXY_PORTS['redsocks']};
    ip = {GATEWAY};
    port = {DANTE_PORT};
    type = socks5;
    splice = on;
    listenq = 4096;
}}
""")
    (net.tmp / "redsocks-conn.log").touch(mode=0o666)
    process = net.client.spawn("redsocks", ["redsocks", "-c", str(conf)])
    net.wait_listening(net.client, PROXY_PORTS["redsocks"], process)
    return process


def project_config(net: Net, seccomp: str = "kill", isolation: str | None = None) -> Path:
    """The daemon's config: its defaults but for the ports, limits and, if given, isolation."""
    iso = f"    isolation = {isolation}\n" if isolation else ""
    return net.file("metaproxy.conf", f"""\
[daemon]
seccomp = {seccomp}
listen = 127.0.0.1,
port = {PROXY_PORTS['project']}
user = nobody
max_connections = {MAX_CONNECTIONS}
idle_timeout = 900
[upstreams]
    [[dante]]
    type = socks5
    address = {GATEWAY}:{DANTE_PORT}
{iso}[routes]
* = dante
""")


def project_argv(conf: Path, loop: str) -> tuple[list[str], str]:
    """How to start metaproxy, and a note on anything that differs from production.

    The plain ``python3 -m metaproxy -c FILE``, or bench/launch_project.py
    to choose another event loop.
    """
    if loop == "default":
        return [PYTHON, "-m", "metaproxy", "-c", str(conf)], ""
    return [PYTHON, str(HERE / "launch_project.py"), "--loop", loop, "-c", str(conf)], f"loop={loop}"


def start_project(net: Net, loop: str = "default", extra_env: dict[str, str] | None = None,
                  seccomp: str = "kill", isolation: str | None = None) -> tuple[Process, str]:
    conf = project_config(net, seccomp, isolation)
    argv, note = project_argv(conf, loop)
    env = clean_env(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", **(extra_env or {}))
    if seccomp != "kill":
        note = "; ".join(filter(None, [note, f"seccomp={seccomp}"]))
    if isolation:
        note = "; ".join(filter(None, [note, f"isolation={isolation}"]))
    if extra_env:
        note = "; ".join(filter(None, [note, " ".join(f"{k}={v}" for k, v in extra_env.items())]))
    process = net.client.spawn("metaproxy", argv, env=env, cwd=str(REPO))
    net.wait_listening(net.client, PROXY_PORTS["project"], process)
    return process, note


def proxy_pid_ok(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}/stat")
