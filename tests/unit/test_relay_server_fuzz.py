"""Hostile upstream replies, fuzzed, through the real Server and Relay.

A real ``metaproxy.relay.server.Server`` runs on loopback in a background
event loop. The one thing it cannot have outside a REDIRECT rule, the original
destination, comes from a stand-in for ``original_destination``; the rest is
the daemon's own code: accept, route, handshake (python-socks behind our
framed stream), refusal, splice relay, close.

A scripted fake upstream answers each connection with bytes that hypothesis
generates for SOCKS5 (with and without RFC 1929 auth), SOCKS4 and HTTP
CONNECT: valid replies, truncated ones, wrong versions, refusal codes, huge
HTTP headers, flipped bytes, random bytes. It delivers them at once, in random
chunks or byte by byte, ahead of the request or in step with it, and then
echoes, closes, resets or goes silent.

An independent reference parser says whether the bytes form a valid reply.
Each connection must then end one way only:

* invalid: the client reads no byte and sees a reset (or EOF), and the log
  has exactly one line for that connection, a one-line "refused" that names
  no destination;
* valid: the client reads exactly the bytes that followed the reply, then the
  echo of its own bytes, then EOF.

After every example a well-behaved upstream still serves the next client,
nothing is left open, and the event loop saw no unhandled exception.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Coroutine, Iterator, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metaproxy.relay.server as server_module
from metaproxy.config.loader import parse_configobj
from metaproxy.relay.server import RefusalLog, Server

T = TypeVar("T")
DEST_IP = "198.51.100.2"  # RFC 5737; never contacted: the fake upstream stands in for it
MAX_HTTP_REPLY = 16 * 1024
# Destination port -> upstream. The "_short" twins (port + SHORT) have a short
# connect_timeout, used for broken replies, so that a timeout costs little.
PORTS = {"socks5": 1001, "socks5auth": 1002, "socks4": 1003, "http": 1004}
SHORT = 1000
LONG_TIMEOUT, SHORT_TIMEOUT = 5.0, 0.4
ENDINGS = ("echo", "close", "reset", "silent")
EXAMPLES = int(os.environ.get("METAPROXY_FUZZ_EXAMPLES", "60"))


def config_text(fake_port: int, prefix: str = "") -> str:
    # log_connections: the fuzz judges each connection by its open/close lines.
    out = ["[daemon]", "listen = 127.0.0.1,", "port = 8675", "log_connections = yes", "[upstreams]"]
    kinds = {"socks5": ("socks5", "none"), "socks5auth": ("socks5", "connection"),
             "socks4": ("socks4", "none"), "http": ("http", "none")}
    for name, (kind, isolation) in kinds.items():
        for suffix, timeout in (("", LONG_TIMEOUT), ("_short", SHORT_TIMEOUT)):
            out += [f"    [[{prefix}{name}{suffix}]]", f"    type = {kind}", f"    address = 127.0.0.1:{fake_port}",
                    f"    isolation = {isolation}", f"    connect_timeout = {timeout}"]
    out.append("[routes]")
    for name, port in PORTS.items():
        out += [f"{port} = {prefix}{name}", f"{port + SHORT} = {prefix}{name}_short"]
    return "\n".join(out) + "\n"


# ---- the reference: where a valid reply ends (None: not a valid success) ---------------

def reference_end(kind: str, stream: bytes) -> int | None:
    if kind in ("socks5", "socks5auth"):
        return _socks5_end(stream, b"\x00\x02" if kind == "socks5auth" else b"\x00")
    if kind == "socks4":
        # VN 0, or 4 as some servers echo it.
        return 8 if len(stream) >= 8 and stream[0] in (0, 4) and stream[1] == 0x5A else None
    return _http_end(stream)


def _socks5_end(stream: bytes, offered: bytes) -> int | None:
    if len(stream) < 2 or stream[0] != 5 or stream[1] not in offered:
        return None
    pos = 2
    if stream[1] == 2:
        if stream[2:4] != b"\x01\x00":
            return None
        pos = 4
    head = stream[pos:pos + 4]
    if len(head) < 4 or head[:3] != b"\x05\x00\x00":
        return None
    if head[3] == 1:
        end = pos + 4 + 4 + 2
    elif head[3] == 4:
        end = pos + 4 + 16 + 2
    elif head[3] == 3 and len(stream) > pos + 4:
        end = pos + 5 + stream[pos + 4] + 2
    else:
        return None
    return end if len(stream) >= end else None


def _http_end(stream: bytes) -> int | None:
    cut = stream.find(b"\r\n\r\n")
    if cut < 0 or cut + 4 > MAX_HTTP_REPLY:
        return None
    line = stream.split(b"\r\n", 1)[0]
    parts = line.split(None, 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.0", b"HTTP/1.1") or len(parts[1]) != 3 \
            or not parts[1].isdigit():
        return None
    # Any 2xx opens the tunnel (RFC 9110).
    return cut + 4 if parts[1].startswith(b"2") else None


# ---- what the fake upstream does ------------------------------------------------------

@dataclass(frozen=True)
class Script:
    kind: str                  # socks5, socks5auth, socks4, http
    stream: bytes              # everything the upstream sends before the ending
    pieces: int                # 1: at once; 0: byte by byte; n: n random-ish pieces
    delay: float               # between pieces
    eager: bool                # SOCKS5: send it all once the greeting is in, not in step
    ending: str                # echo, close, reset, silent
    slow: bool = False         # no cap on the delivery time (the connect timeout test)

    @property
    def end(self) -> int | None:
        return reference_end(self.kind, self.stream)

    @property
    def port(self) -> int:
        # A broken reply may leave the daemon waiting for more: let it give up soon.
        return PORTS[self.kind] + (SHORT if self.end is None or self.slow else 0)


async def _deliver(writer: asyncio.StreamWriter, data: bytes, script: Script) -> None:
    if not data:
        return
    if script.pieces == 1:
        writer.write(data)
        await writer.drain()
        return
    size = 1 if script.pieces == 0 else max(1, len(data) // script.pieces)
    # Bound the whole delivery to well under the connect timeout.
    delay = script.delay if script.slow else min(script.delay, 0.15 / max(1, len(data) // size))
    for i in range(0, len(data), size):
        writer.write(data[i:i + size])
        await writer.drain()
        if delay:
            await asyncio.sleep(delay)


async def _socks5(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Script) -> None:
    greeting = await reader.readexactly(2)
    methods = await reader.readexactly(greeting[1])
    data = s.stream
    if len(data) < 2 or data[0] != 5 or data[1] not in methods:
        await _deliver(writer, data, s)  # the daemon stops here: nothing more to read
        return
    if s.eager:
        await _deliver(writer, data, s)  # all of it before the requests it answers
    else:
        writer.write(data[:2])
    pos = 2
    if data[1] == 2:
        _, ulen = await reader.readexactly(2)
        await reader.readexactly(ulen)
        (plen,) = await reader.readexactly(1)
        await reader.readexactly(plen)
        if data[2:4] != b"\x01\x00":
            if not s.eager:
                await _deliver(writer, data[2:], s)
            return
        if not s.eager:
            writer.write(data[2:4])
        pos = 4
    await reader.readexactly(10)  # VER CMD RSV ATYP=1 IPv4 PORT
    if not s.eager:
        await _deliver(writer, data[pos:], s)


async def _socks4(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Script) -> None:
    await reader.readexactly(8)
    await reader.readuntil(b"\x00")  # user id
    await _deliver(writer, s.stream, s)


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Script) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await _deliver(writer, s.stream, s)


HANDSHAKES = {"socks5": _socks5, "socks5auth": _socks5, "socks4": _socks4, "http": _http}


async def _ending(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Script) -> None:
    if s.ending == "echo":
        for _ in range(10_000):  # bounded: the client sends a few KB at most
            chunk = await reader.read(65536)
            if not chunk:
                break
            writer.write(chunk)
            await writer.drain()
    elif s.ending == "reset":
        sock = writer.get_extra_info("socket")
        if not writer.is_closing():  # the daemon may have hung up already
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif s.ending == "silent":
        # Never answer again; go only when the daemon gives up (bounded anyway).
        try:
            async with asyncio.timeout(10):
                while await reader.read(65536):
                    pass
        except TimeoutError:
            pass


# ---- the harness: a real Server in a background event loop --------------------------

@dataclass
class Outcome:
    data: bytes
    reset: bool
    eof: bool
    seconds: float


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.items: list[tuple[int | None, int, str]] = []
        self._lock_items = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_items:
            self.items.append((record.__dict__.get("cid"), record.levelno, record.getMessage()))

    def since(self, mark: int) -> list[tuple[int | None, int, str]]:
        with self._lock_items:
            return list(self.items[mark:])


class Harness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-daemon", daemon=True)
        self.loop_errors: list[str] = []
        self.records = _Records()
        self.script: Script | None = None
        self.dest_port = PORTS["socks5"]
        self.fake_errors: list[str] = []
        self.fake_active = 0
        self._original = server_module.original_destination

    def __enter__(self) -> "Harness":
        logger = logging.getLogger("metaproxy")
        logger.addHandler(self.records)
        logger.setLevel(logging.INFO)
        server_module.original_destination = lambda sock, mode: (DEST_IP, self.dest_port)  # type: ignore
        self.thread.start()
        self.call(self._setup())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self._teardown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            server_module.original_destination = self._original
            logging.getLogger("metaproxy").removeHandler(self.records)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _setup(self) -> None:
        self.loop.set_exception_handler(
            lambda loop, ctx: self.loop_errors.append(f"{ctx.get('message')}: {ctx.get('exception')!r}"))
        self.fake = await asyncio.start_server(self._upstream, "127.0.0.1", 0, backlog=512)
        fake_port = self.fake.sockets[0].getsockname()[1]
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        listener.setblocking(False)
        self.address = listener.getsockname()
        self.fake_port = fake_port
        self.server = Server(parse_configobj("<fuzz>", config_text(fake_port)), [listener])
        # Every refusal is judged by its line: no rate limit here (RefusalLog has its own test).
        self.server.refusals = RefusalLog(asyncio.get_running_loop(), 10**9)
        self.server.start()

    async def _teardown(self) -> None:
        await self.server.drain(0)
        self.server.pool.close()
        for sock in self.server.listeners:
            sock.close()
        self.fake.close()
        await self.fake.wait_closed()

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        script = self.script
        self.fake_active += 1
        try:
            if script is None:
                return
            await HANDSHAKES[script.kind](reader, writer, script)
            await _ending(reader, writer, script)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the daemon gave up on us: expected for broken replies
        except Exception as e:  # a bug in the fake itself must fail the test, not vanish
            self.fake_errors.append(repr(e))
        finally:
            writer.close()
            self.fake_active -= 1

    # -- per connection ------------------------------------------------------------

    def exchange(self, script: Script, payload: bytes, timeout: float = 10) -> Outcome:
        self.script = script
        self.dest_port = script.port
        start = time.monotonic()
        chunks: list[bytes] = []
        reset = eof = False
        try:
            sock = socket.create_connection(self.address, timeout=timeout)
        except ConnectionResetError:
            # The daemon refused so fast that the RST came before connect() returned.
            return Outcome(b"", True, False, time.monotonic() - start)
        with sock:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                reset = True
            except OSError as e:
                if e.errno != errno.ENOTCONN:  # reset before shutdown() got to it
                    raise
                reset = True
            for _ in range(100_000):
                if reset:
                    break
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    reset = True
                    break
                except socket.timeout:
                    break  # neither: a hang, reported by the caller
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
        return Outcome(b"".join(chunks), reset, eof, time.monotonic() - start)

    def wait_idle(self, timeout: float = 10) -> None:
        """Until the server holds no connection (bounded)."""
        async def idle() -> bool:
            for _ in range(3):  # let closes scheduled with call_soon run first
                await asyncio.sleep(0)
            s = self.server
            return s.counters.open == 0 and not s.relays and not s.pending and not self.fake_active
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.005) + 1):
            if self.call(idle()):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        raise AssertionError(f"the server still holds connections after {timeout}s: "
                             f"{self.server.counters.status()}")

    def fds(self) -> int:
        """Our descriptors, not counting pipes parked in the daemon's pool."""
        return len(os.listdir("/proc/self/fd")) - 2 * len(self.server.pool._free)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with Harness() as h:
        yield h


def check(h: Harness, script: Script, payload: bytes) -> None:
    """One connection through the daemon, judged against the reference."""
    mark = len(h.records.items)
    before = h.server.counters.total
    outcome = h.exchange(script, payload)
    h.wait_idle()
    assert h.server.counters.total == before + 1
    cid = before + 1
    lines = [(level, text) for c, level, text in h.records.since(mark) if c == cid]
    stray = [text for c, _, text in h.records.since(mark) if c is None]
    assert not stray, f"log lines without a connection id: {stray}"
    end = script.end
    where = f"{script!r}\noutcome {outcome!r}\nlog {lines!r}"
    # A reset right after a valid reply may overtake it: TCP lets an RST discard
    # data not yet read, so the daemon may see the handshake die. Either way is right.
    overtaken = script.ending == "reset" and len(lines) == 1 and " refused: " in lines[0][1]
    if end is None or overtaken:
        assert outcome.data == b"", "a broken reply let bytes through to the client: " + where
        assert outcome.reset or outcome.eof, "the client was left hanging: " + where
        assert len(lines) == 1, "expected exactly one log line for a refused connection: " + where
        level, text = lines[0]
        assert level == logging.WARNING and f"cid={cid} refused: upstream " in text, where
        assert DEST_IP not in text, "the refusal names the destination: " + where
        assert text.isprintable(), "the upstream's bytes reached the log unescaped: " + where
        return
    trailer = script.stream[end:]
    if script.ending == "echo":
        assert outcome.data == trailer + payload, "bytes lost or changed: " + where
        assert outcome.eof and not outcome.reset, where
        assert [t.split(" ", 2)[1] for _, t in lines] == ["open", "close"], where
        assert "close (closed)" in lines[1][1], where
    else:
        assert trailer.startswith(outcome.data), "the client got bytes the upstream never sent: " + where
        assert outcome.reset or outcome.eof, "the client was left hanging: " + where
        assert [t.split(" ", 2)[1] for _, t in lines] == ["open", "close"], where


def probe(h: Harness) -> None:
    """A well-behaved upstream still works after whatever came before."""
    payload = os.urandom(3000)
    ok = Script("socks5", b"\x05\x00\x05\x00\x00\x01" + bytes(6) + b"hello", 1, 0.0, False, "echo")
    outcome = h.exchange(ok, payload)
    assert outcome.data == b"hello" + payload and outcome.eof, f"the next client was not served: {outcome!r}"
    h.wait_idle()


# ---- generators -------------------------------------------------------------------

def socks5_reply(draw: st.DrawFn, code: int = 0) -> bytes:
    atyp = draw(st.sampled_from([1, 3, 4]))
    if atyp == 1:
        addr = draw(st.binary(min_size=4, max_size=4))
    elif atyp == 4:
        addr = draw(st.binary(min_size=16, max_size=16))
    else:
        name = draw(st.binary(min_size=0, max_size=255))
        addr = bytes([len(name)]) + name
    return bytes([5, code, 0, atyp]) + addr + draw(st.binary(min_size=2, max_size=2))


def valid_stream(draw: st.DrawFn, kind: str) -> bytes:
    if kind == "socks5":
        return b"\x05\x00" + socks5_reply(draw)
    if kind == "socks5auth":
        method = draw(st.sampled_from([b"\x05\x00", b"\x05\x02\x01\x00"]))
        return method + socks5_reply(draw)
    if kind == "socks4":
        return b"\x00\x5a" + draw(st.binary(min_size=6, max_size=6))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    reason = draw(st.sampled_from([b" Connection established", b" OK", b"", b" x" * 300]))
    # Header names and values from fixed alphabets (st.text would need hypothesis' unicode cache).
    names = st.lists(st.sampled_from(b"abcdefXYZ-"), min_size=1, max_size=20).map(bytes)
    values = st.lists(st.sampled_from(b"abc 123;=/\t"), max_size=200).map(bytes)
    headers = draw(st.lists(st.tuples(names, values), max_size=20))
    head = version + b" 200" + reason + b"\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"\r\n"


@st.composite
def streams(draw: st.DrawFn, kind: str) -> bytes:
    """What an upstream sends: valid, refused, truncated, mutated, huge or random."""
    shape = draw(st.sampled_from(["valid", "refused", "truncated", "flipped", "version", "huge", "random"]))
    trailer = draw(st.binary(max_size=2048))
    if shape == "random":
        return draw(st.binary(max_size=400))
    if shape == "huge":
        if kind == "http":
            filler = b"X-Filler: " + b"a" * draw(st.integers(MAX_HTTP_REPLY - 64, 3 * MAX_HTTP_REPLY))
            return b"HTTP/1.1 200 OK\r\n" + filler + b"\r\n\r\n" + trailer
        return valid_stream(draw, kind) + os.urandom(draw(st.integers(20_000, 100_000)))
    if shape == "refused":
        if kind == "socks4":
            return b"\x00" + bytes([draw(st.integers(0x5B, 0xFF))]) + bytes(6)
        if kind == "http":
            code = draw(st.integers(100, 999).filter(lambda c: c != 200))
            return f"HTTP/1.1 {code} Nope\r\n\r\n".encode() + trailer
        return b"\x05\x00" + socks5_reply(draw, draw(st.integers(1, 255)))
    valid = valid_stream(draw, kind)
    if shape == "valid":
        return valid + trailer
    if shape == "truncated":
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if shape == "version":
        first = {"socks4": 0, "http": ord("H")}.get(kind, 5)
        index = 2 if kind in ("socks5", "socks5auth") and draw(st.booleans()) else 0
        return valid[:index] + bytes([draw(st.integers(0, 255).filter(lambda b: b != first))]) \
            + valid[index + 1:] + trailer
    # flipped: one byte of the reply replaced (the reference decides if it is still valid)
    index = draw(st.integers(0, len(valid) - 1))
    return valid[:index] + bytes([draw(st.integers(0, 255))]) + valid[index + 1:] + trailer


@st.composite
def scripts(draw: st.DrawFn, kinds: tuple[str, ...]) -> Script:
    kind = draw(st.sampled_from(kinds))
    stream = draw(streams(kind))
    valid = reference_end(kind, stream) is not None
    return Script(kind=kind, stream=stream,
                  pieces=draw(st.sampled_from([1, 1, 0, 2, 3, 7])),
                  delay=draw(st.sampled_from([0.0, 0.0, 0.001, 0.003])),
                  eager=draw(st.booleans()),
                  # A valid reply is mostly followed by the echo, so that every byte can be
                  # checked; sometimes the upstream closes, resets or falls silent after it.
                  ending=draw(st.sampled_from(("echo",) * 3 + ENDINGS[1:] if valid else ENDINGS)))


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


# ---- the tests --------------------------------------------------------------------

@pytest.mark.parametrize("kinds", [("socks5", "socks5auth"), ("socks4",), ("http",)],
                         ids=["socks5", "socks4", "http"])
def test_hostile_upstream_reply_resets_that_client_logs_once_and_keeps_serving(
        harness: Harness, kinds: tuple[str, ...]) -> None:
    """Each generated reply: a broken one resets its client with one log line, a valid
    one relays every byte; either way the next client is served and nothing leaks."""
    probe(harness)
    fds = harness.fds()

    @FUZZ
    @given(script=scripts(kinds), payload=st.binary(max_size=4096))
    def one(script: Script, payload: bytes) -> None:
        check(harness, script, payload)
        probe(harness)

    one()
    assert not harness.loop_errors, f"unhandled exceptions in the event loop: {harness.loop_errors}"
    assert not harness.fake_errors, f"the fake upstream itself failed: {harness.fake_errors}"
    assert harness.fds() <= fds, "descriptors leaked"


@pytest.mark.parametrize("kind", sorted(PORTS))
def test_upstream_that_answers_too_slowly_is_timed_out_and_reset(harness: Harness, kind: str) -> None:
    """An upstream that dribbles a valid reply out slower than connect_timeout: the
    client is reset after about that long, with one log line that says so."""
    stream = {"socks5": b"\x05\x00\x05\x00\x00\x01" + bytes(6), "socks5auth": b"\x05\x00\x05\x00\x00\x01" + bytes(6),
              "socks4": b"\x00\x5a" + bytes(6), "http": b"HTTP/1.1 200 OK\r\n\r\n"}[kind]
    script = Script(kind, stream, pieces=0, delay=0.2, eager=False, ending="silent", slow=True)
    mark = len(harness.records.items)
    outcome = harness.exchange(script, b"x")
    harness.wait_idle()
    lines = [t for c, _, t in harness.records.since(mark) if c is not None]
    assert outcome.data == b"" and (outcome.reset or outcome.eof), outcome
    assert SHORT_TIMEOUT * 0.8 < outcome.seconds < SHORT_TIMEOUT + 2, outcome
    assert len(lines) == 1 and "connect_timeout" in lines[0], lines
    probe(harness)


def test_payload_in_the_same_segment_as_each_valid_reply_is_relayed(harness: Harness) -> None:
    """Data after the reply (a server banner) reaches the client first and intact,
    for every upstream type, even when the upstream sends it all before reading."""
    for kind in sorted(PORTS):
        for eager in (False, True):
            stream = {"socks5": b"\x05\x00\x05\x00\x00\x03\x05hello\x00\x50",
                      "socks5auth": b"\x05\x02\x01\x00\x05\x00\x00\x04" + bytes(18),
                      "socks4": b"\x00\x5a" + bytes(6),
                      "http": b"HTTP/1.0 200 OK\r\nVia: x\r\n\r\n"}[kind]
            banner = b"SSH-2.0-OpenSSH_9.2\r\n" + os.urandom(5000)
            check(harness, Script(kind, stream + banner, 1, 0.0, eager, "echo"), os.urandom(777))


def test_no_descriptor_left_for_the_upstream_socket_resets_the_client(harness: Harness) -> None:
    """accept() takes the last descriptor the limit allows, so the upstream socket cannot
    be made (EMFILE): that client is reset with one log line, not left hanging with its
    slot counted as open for ever."""
    probe(harness)
    mark = len(harness.records.items)
    before = harness.server.counters.total
    harness.script = Script("socks5", b"\x05\x00\x05\x00\x00\x01" + bytes(6), 1, 0.0, False, "echo")
    harness.dest_port = PORTS["socks5"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with socket.socket() as client:
        client.settimeout(3)
        lowest = os.dup(0)  # the lowest free descriptor number: the daemon's accept() gets it
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + 1, hard))
        reset_early = False
        try:
            try:
                client.connect(harness.address)
            except ConnectionResetError:
                reset_early = True  # refused before connect() returned: fine
            for _ in range(400):  # until the daemon has tried, at most 2s
                if harness.server.counters.total > before and not harness.server.pending:
                    break
                time.sleep(0.005)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            got = b"" if reset_early else client.recv(100)
            assert got == b"", f"expected a reset or EOF, got {got!r}"
        except ConnectionResetError:
            pass
        except socket.timeout:
            pytest.fail("the client was left hanging when the upstream socket could not be made")
    harness.wait_idle(timeout=2)
    lines = [t for c, _, t in harness.records.since(mark) if c == before + 1]
    assert len(lines) == 1 and "refused" in lines[0], lines
    # An expected condition with a remedy, not an "internal error".
    assert "Too many open files" in lines[0] and "internal error" not in lines[0], lines
    probe(harness)


def test_reload_between_accept_and_handshake_keeps_the_routed_upstream(harness: Harness) -> None:
    """A SIGHUP reload can run after a connection was accepted and routed and before its
    handshake task starts: both are callbacks of one pass of the event loop. A reload
    that renames the upstream must not break that connection (it keeps the upstream it
    was routed to, as open connections do), nor log an internal error."""
    probe(harness)
    original = harness.server.config
    renamed = parse_configobj("<fuzz>", config_text(harness.fake_port, prefix="new_"))
    harness.script = Script("socks5", b"\x05\x00\x05\x00\x00\x01" + bytes(6) + b"hi", 1, 0.0, False, "echo")
    harness.dest_port = PORTS["socks5"]
    mark = len(harness.records.items)

    async def stop() -> None:
        harness.server.stop_accepting()

    async def accept_then_reload() -> None:
        server = harness.server
        listener = server.listeners[0]
        for _ in range(200):  # the connection may still be on its way into the backlog
            try:
                conn, peer = listener.accept()
                break
            except BlockingIOError:
                await asyncio.sleep(0.005)
        else:
            raise AssertionError("the test's connection never reached the listener")
        server._serve(conn, peer)  # routed; its handshake task is scheduled, not started
        server.apply(renamed)      # the reload lands first
        server.start()

    harness.call(stop())
    try:
        with socket.create_connection(harness.address, timeout=5) as sock:
            harness.call(accept_then_reload())
            payload = os.urandom(1000)
            got = b""
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # reset already: the assertion below says why
            for _ in range(1000):
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
    finally:
        async def restore() -> None:
            harness.server.apply(original)
            if not harness.server._accepting:
                harness.server.start()
        harness.call(restore())
    harness.wait_idle()
    lines = [t for c, _, t in harness.records.since(mark) if c is not None]
    assert got == b"hi" + payload, f"the connection broke across the reload: got {len(got)} bytes; {lines}"
    assert not any("internal error" in t for t in lines), lines
    probe(harness)
