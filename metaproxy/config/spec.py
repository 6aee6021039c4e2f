"""The configspec: every key, its type and its default.

The man page subgraph_metaproxy.conf(5) and etc/subgraph_metaproxy.conf must
name every key here; tests/unit/test_docs_in_step.py keeps them in step.
"""

CONFIGSPEC = """
[daemon]
listen = string_list(default=list('127.0.0.1', '::1'))
port = integer(1, 65535, default=8675)
mode = option('redirect', 'tproxy', default='redirect')
user = string(min=1, default='_metaproxy')
groups = string_list(default=list())
max_connections = integer(1, 1000000, default=4096)
idle_timeout = float(0, 604800, default=900)
connect_timeout = float(0.1, 600, default=None)
drain_timeout = float(0, 3600, default=10)
log_destinations = boolean(default=False)
log_connections = boolean(default=False)
log_refusals = integer(0, 100000, default=10)
seccomp = option('kill', 'log', 'trap', 'off', default='kill')

[upstreams]
[[__many__]]
type = option('socks5', 'socks4', 'socks4a', 'http')
address = string(min=1)
username = string(max=255, default='')
password = string(max=255, default='')
connect_timeout = float(0.1, 600, default=None)
isolation = string_list(default=list('user', 'destination'))
isolation_period = integer(0, 86400, default=600)

[routes]
__many__ = string(min=1)

[firewall]
dns = string(default='')
exempt_users = string_list(default=list())
lan_interfaces = string_list(default=list())
tor_virtual_networks = string_list(default=list('10.192.0.0/10', 'fe80::/10'))
"""

# What each check expects, in words, for error messages.
EXPECTED = {
    "listen": "a comma-separated list of IP addresses",
    "port": "an integer from 1 to 65535",
    "mode": "one of redirect, tproxy",
    "user": "a user name",
    "groups": "a comma-separated list of group names",
    "max_connections": "an integer from 1 to 1000000",
    "idle_timeout": "seconds, from 0 to 604800",
    "connect_timeout": "seconds, from 0.1 to 600",
    "drain_timeout": "seconds, from 0 to 3600",
    "log_destinations": "yes or no",
    "log_connections": "yes or no",
    "log_refusals": "refusal lines per minute, from 0 to 100000",
    "seccomp": "one of kill, log, trap, off",
    "type": "one of socks5, socks4, socks4a, http",
    "address": "ip:port, [ipv6]:port or unix:/path",
    "username": "at most 255 characters",
    "password": "at most 255 characters",
    "isolation": ("destination, user and client, alone or combined with commas, or connection or none "
                  "alone"),
    "isolation_period": "seconds, from 0 (never rotate) to 86400",
    "dns": "ip:port or [ipv6]:port, or empty",
    "exempt_users": "a comma-separated list of user names",
    "lan_interfaces": "a comma-separated list of interface names, or prefixes ending in '*'",
    "tor_virtual_networks": "a comma-separated list of IP networks (Tor's VirtualAddrNetworkIPv4/IPv6), or empty",
}
