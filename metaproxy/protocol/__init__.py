"""Protocol logic free of I/O: the upstream handshakes, wire codes, credentials, sockaddr parsing.

Nothing here imports asyncio or socket, so it is tested with bytes alone.
"""
