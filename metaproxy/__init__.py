"""subgraph_metaproxy: a transparent proxy redirector.

Connections that netfilter redirected to the daemon are relayed through the
upstream proxy (SOCKS5, SOCKS4/4a or HTTP CONNECT) that the configuration picks
for their original destination port.
"""

__version__ = "0.1.0"
