"""Protocol logic free of I/O: wire codes, framing, credentials, sockaddr parsing.

Nothing here imports asyncio or socket, so it is tested with bytes alone.
"""
