"""The lab of the gateway tier: a router namespace with a LAN bridge behind it.

    vm1      203.0.113.11  2001:db8:3::11 ─┐
    vm2      203.0.113.12  2001:db8:3::12 ─┤ br0 203.0.113.1/24 2001:db8:3::1/64
    sandbox  203.0.113.13  (IPv4 only)    ─┘  │
                                            router ("client" of lab.py: the daemon, the rules)
                                              │ to-gw 192.0.2.1  2001:db8:1::1   <- the uplink, captured
                                            upstream ("gateway" of lab.py): dante, a decoy resolver
                                              │ 198.51.100.1
                                            web 198.51.100.2  2001:db8:2::2: nginx

It is ``lab.Lab`` (the same three namespaces, addresses and teardown) plus
the bridge and the three LAN namespaces, so that ``Daemon`` (which runs in
``lab.client``) and the peers of ``peers.py`` work unchanged. The router
forwards (net.ipv4.ip_forward=1, IPv6 forwarding on): the worst case an
administrator can set, so that only the rules stand between a LAN client
and the uplink. The upstream namespace forwards nothing, and no namespace
has a route out of the machine: the LAN's default route ends at the router,
whose only routes lead to the upstream namespace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tests.system.lab import Lab, Namespace, run

BRIDGE = "br0"
LAN4, LAN6 = "203.0.113.1", "2001:db8:3::1"          # the router on the bridge
LAN_NET4, LAN_NET6 = "203.0.113.0/24", "2001:db8:3::/64"


@dataclass
class LanClient:
    """A machine behind the router: a VM (IPv4 and IPv6) or a sandbox (IPv4 only)."""
    name: str
    ns: Namespace
    ipv4: str
    ipv6: str | None

    @property
    def addresses(self) -> list[str]:
        return [self.ipv4] + ([self.ipv6] if self.ipv6 else [])


@dataclass
class GatewayLab(Lab):
    prefix: str = field(default_factory=lambda: f"mpgw{os.getpid()}")
    lan: list[LanClient] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lan = [LanClient("vm1", Namespace(f"{self.prefix}v1", self), "203.0.113.11", "2001:db8:3::11"),
                    LanClient("vm2", Namespace(f"{self.prefix}v2", self), "203.0.113.12", "2001:db8:3::12"),
                    LanClient("sandbox", Namespace(f"{self.prefix}sb", self), "203.0.113.13", None)]

    @property
    def router(self) -> Namespace:
        return self.client

    def build(self) -> None:
        super().build()
        router = self.router
        self._sysctl(router, "net.ipv4.ip_forward", "1")
        self._sysctl(router, "net.ipv6.conf.all.forwarding", "1")
        run(["ip", "-n", router.name, "link", "add", BRIDGE, "type", "bridge"])
        self._address(router, BRIDGE, f"{LAN4}/24", f"{LAN6}/64")
        for index, client in enumerate(self.lan):
            run(["ip", "netns", "add", client.ns.name])
            self._namespaces.append(client.ns.name)
            self._ip(client.ns, "link", "set", "lo", "up")
            self._sysctl(client.ns, "net.ipv6.conf.default.accept_ra", "0")
            port = f"lan{index}"
            run(["ip", "link", "add", "eth0", "netns", client.ns.name, "type", "veth",
                 "peer", "name", port, "netns", router.name])
            self._ip(router, "link", "set", port, "master", BRIDGE)
            self._ip(router, "link", "set", port, "up")
            self._sysctl(client.ns, "net.ipv6.conf.eth0.accept_ra", "0")
            self._ip(client.ns, "addr", "add", f"{client.ipv4}/24", "dev", "eth0")
            if client.ipv6:
                self._ip(client.ns, "-6", "addr", "add", f"{client.ipv6}/64", "dev", "eth0", "nodad")
            else:
                self._sysctl(client.ns, "net.ipv6.conf.eth0.disable_ipv6", "1")
            self._ip(client.ns, "link", "set", "eth0", "up")
            self._ip(client.ns, "route", "add", "default", "via", LAN4)
            if client.ipv6:
                self._ip(client.ns, "-6", "route", "add", "default", "via", LAN6)
