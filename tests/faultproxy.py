"""A fault-injecting HTTP reverse proxy in front of an S3 server on loopback.

Real object storage is tens of milliseconds away, throttles with 503 SlowDown, drops
connections and has outages; the S3 servers of the tests (moto, SeaweedFS) answer in a
millisecond and never fail. This proxy sits between a client and such a server and makes
it behave like the real thing, switchable while it runs. The kernel of a CI machine often
has no ``netem``; a proxy works everywhere, and it fails requests (not packets), which is
what an S3 client sees.

Forwarding is byte-exact: the request head, including its Host header, goes upstream as
the client sent it, so the client signs for the proxy's host:port and the server checks
the signature against that same Host (moto and SeaweedFS accept any Host with path-style
addressing). Bodies are framed by Content-Length, chunked encoding or end of stream;
``Expect: 100-continue`` is passed through (botocore sends it for every PUT of a file-like
body) and the server's ``100 Continue`` relayed; HEAD answers have no body.

Answers are relayed byte-exact too, with one exception: a ``Connection: close`` line is
left out (when the body's length is known without it) and the client's connection kept,
the proxy opening a new upstream connection for the next request. moto's server closes
every connection after one answer; real S3 keeps them, and the client's connection pool
(stale or held pooled connections during faults) is part of what the tests exercise.

In-process use (a thread runs the proxy's event loop; every method is thread-safe)::

    proxy = FaultProxy("http://127.0.0.1:9000", rtt=0.03).start()
    proxy.url                        # http://127.0.0.1:PORT, the endpoint to give clients
    proxy.set_rtt(0.03, jitter=0.005)
    proxy.blackhole()                # requests held: their connections never answered
    proxy.reset(share=0.5)           # half the requests: connection closed with a RST
    proxy.error(503, "SlowDown", share=0.7)   # or error(500, "InternalError")
    proxy.slow_body(100_000)         # response bodies trickle at 100 kB/s
    proxy.heal()                     # no fault (the round trip stays)
    proxy.stats()                    # counters, see FaultProxy.stats
    proxy.completed(since=0)         # the request log (with log_size), see FaultProxy.completed
    proxy.close()

One fault mode at a time: each of blackhole, reset, error and slow_body replaces the
previous one. The round trip is independent of them.

- ``rtt``: half of it before a request is forwarded, half before its answer is relayed,
  each request drawing rtt + uniform(-jitter, jitter). A ``100 Continue`` costs what it
  costs on a network, a whole round trip: its way back and the body's way out, both
  counted before it is relayed.
  An error answer costs the whole round trip, a reset the first half.
- blackhole: a request (on a connection old or new) is held once its head has arrived, and
  so is the answer of a request already forwarded. A held connection is lost, as behind a
  partition that dropped its state: it is never answered, even after the mode ends, and
  stays open until the client gives up on it (its read timeout); a held request is never
  forwarded. Connections opened after the mode ends are served normally.
- reset: the request is not forwarded; its connection is closed with SO_LINGER 0, so the
  client gets a RST (ECONNRESET) instead of an answer.
- error: the request is not forwarded; the answer is the status with S3's XML error body.
  Its body is read first and the connection kept, unless the client waits for ``100
  Continue``: then no body comes and the connection is closed after the answer.

As a process, for benchmarks driving it from elsewhere::

    python -m tests.faultproxy --upstream http://127.0.0.1:9000 --rtt 0.03 [--jitter 0.005]
        [--listen 127.0.0.1:0] [--log-size N]

prints the proxy's URL on one line, then serves until SIGTERM or SIGINT. Its control
channel is on the same port, under ``/__proxy__/`` (no S3 bucket name can contain ``_``):

- ``POST /__proxy__/<fault>`` with a JSON object of the method's keyword arguments, for
  ``set_rtt``, ``blackhole``, ``reset``, ``error``, ``slow_body``, ``heal`` and
  ``reset_stats``; e.g. ``POST /__proxy__/error`` ``{"status": 503, "code": "SlowDown",
  "share": 0.7}``. Answers 200 with ``{}``, or 400 with ``{"error": "..."}``.
- ``GET /__proxy__/stats``: the counters as JSON.
- ``GET /__proxy__/log?since=SEQ``: the request log from sequence number SEQ on (with
  ``--log-size N``: the last N requests forwarded upstream are kept).

``control(url, name, **kwargs)`` below is that channel's client. Control requests are never
faulted, delayed or counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import struct
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass

#: The control channel's path prefix on the proxy's own port.
CONTROL_PREFIX = "/__proxy__/"

#: Methods the control channel may call, all of them fault switches or counter resets.
CONTROL_METHODS = ("set_rtt", "blackhole", "reset", "error", "slow_body", "heal", "reset_stats")

#: Bytes copied per read when relaying a body.
COPY_SIZE = 64 * 1024

#: Pending connections the listening socket queues: boto3 opening a thousand connections at
#: once must not be refused (the kernel caps it at net.core.somaxconn).
BACKLOG = 4096

#: Messages of the S3 error answers the proxy knows (others get a generic one).
ERROR_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
}

REASONS = {500: "Internal Server Error", 503: "Service Unavailable", 429: "Too Many Requests"}


@dataclass(frozen=True)
class Mode:
    """The fault applied to requests now: ``kind`` is None, "blackhole", "reset", "error"
    or "slow_body"; the other fields are that kind's parameters."""

    kind: str | None = None
    share: float = 1.0
    status: int = 503
    code: str = "SlowDown"
    bytes_per_second: float = 0.0


@dataclass(frozen=True)
class Head:
    """An HTTP message head as received (``raw``, forwarded unchanged) and parsed."""

    raw: bytes
    start: list[str]
    headers: dict[str, str]

    @classmethod
    def parse(cls, raw: bytes) -> Head:
        lines = raw.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        return cls(raw, lines[0].split(" ", 2), headers)

    def has(self, name: str, token: str) -> bool:
        """Whether header ``name`` lists ``token`` (case-insensitive)."""
        return token in (t.strip().lower() for t in self.headers.get(name, "").split(","))

    def without_connection_close(self) -> bytes:
        """The head without a ``Connection: close`` line (the rest unchanged)."""
        if not self.has("connection", "close"):
            return self.raw
        lines = self.raw.split(b"\r\n")
        return b"\r\n".join(line for line in lines if not line.lower().startswith(b"connection:"))

    def body_framing(self) -> tuple[str, int]:
        """How the body after this head ends: ("chunked", 0), ("length", n) or ("none", 0)."""
        if self.has("transfer-encoding", "chunked"):
            return "chunked", 0
        length = int(self.headers.get("content-length", "0") or 0)
        return ("length", length) if length else ("none", 0)


def response_framing(method: str, response: Head) -> tuple[str, int]:
    """How a response body ends (RFC 9112 section 6.3): no body for HEAD, 1xx, 204 and 304;
    chunked; Content-Length; else at the end of the stream ("eof")."""
    status = int(response.start[1])
    if method == "HEAD" or status < 200 or status in (204, 304):
        return "none", 0
    if response.has("transfer-encoding", "chunked") or "content-length" in response.headers:
        return response.body_framing()
    return "eof", 0


class Sink:
    """A writer that keeps what is written (a control request's body) or drops it."""

    def __init__(self, keep: bool = True):
        self.data = bytearray() if keep else None

    def write(self, data: bytes) -> None:
        if self.data is not None:
            self.data += data

    async def drain(self) -> None:
        pass


async def copy_body(reader, writer, framing: tuple[str, int], bytes_per_second: float = 0.0) -> None:
    """Relay one body from ``reader`` to ``writer`` byte-exact, chunk framing included;
    with ``bytes_per_second``, no faster than that."""
    kind, length = framing
    pace = _Pace(bytes_per_second)
    if kind == "length":
        await _copy_exactly(reader, writer, length, pace)
    elif kind == "eof":
        while data := await reader.read(pace.size(COPY_SIZE)):
            writer.write(data)
            await writer.drain()
            await pace.after(len(data))
    elif kind == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            writer.write(line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            await _copy_exactly(reader, writer, size + 2, pace)  # the data and its CRLF
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":  # trailer fields
            writer.write(line)
        writer.write(line)
        await writer.drain()


async def _copy_exactly(reader, writer, length: int, pace: _Pace) -> None:
    while length:
        data = await reader.read(pace.size(min(length, COPY_SIZE)))
        if not data:
            raise asyncio.IncompleteReadError(b"", length)
        writer.write(data)
        await writer.drain()
        length -= len(data)
        await pace.after(len(data))


class _Pace:
    """Throttles a copy to ``bytes_per_second`` (0: unthrottled) in steps of 1/20 s."""

    def __init__(self, bytes_per_second: float):
        self.rate = bytes_per_second

    def size(self, wanted: int) -> int:
        return min(wanted, max(1, int(self.rate / 20))) if self.rate else wanted

    async def after(self, copied: int) -> None:
        if self.rate:
            await asyncio.sleep(copied / self.rate)


def error_answer(method: str, status: int, code: str, request_id: str, keep_alive: bool) -> bytes:
    """S3's error answer: the status and an XML body naming the code (a HEAD gets the
    headers only, as from S3)."""
    message = ERROR_MESSAGES.get(code, f"{code} (injected by faultproxy)")
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{request_id}</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nx-amz-request-id: {request_id}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()
    return head if method == "HEAD" else head + body


def abort_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a RST: SO_LINGER on with a zero timeout discards unsent
    data and resets instead of the orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Dropped(Exception):
    """The connection ends here without an answer (blackholed, reset, or a side gone)."""


class Connection:
    """One client connection and the upstream connection that serves it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None

    async def upstream(self, host: str, port: int):
        """The upstream connection, opened anew if there is none or the server closed it."""
        if self.up_reader is None or self.up_reader.at_eof() or self.up_writer.is_closing():
            self.close_upstream()
            self.up_reader, self.up_writer = await asyncio.open_connection(host, port, limit=COPY_SIZE * 4)
        return self.up_reader, self.up_writer

    def close_upstream(self) -> None:
        if self.up_writer is not None:
            self.up_writer.transport.abort()
        self.up_reader = self.up_writer = None

    def close(self) -> None:
        self.close_upstream()
        self.writer.close()


class FaultProxy:
    """The proxy; see the module docstring. ``seed`` makes the shares' draws repeatable."""

    def __init__(self, upstream: str, listen: tuple[str, int] = ("127.0.0.1", 0), rtt: float = 0.0,
                 jitter: float = 0.0, seed: int | None = None, log_size: int = 0):
        host_port = upstream.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = host_port.rpartition(":")
        self.upstream = (host, int(port))
        self.listen = listen
        self._lock = threading.Lock()
        self._rtt, self._jitter = rtt, jitter
        self._mode = Mode()
        self._random = random.Random(seed)
        self._counts: Counter = Counter()
        self._methods: Counter = Counter()
        self._faults: Counter = Counter()
        self._in_flight = self._max_in_flight = 0
        # Benchmarks time a commit's visibility by when the store acknowledged its PUT, which
        # only the proxy sees; bounded, since a long run forwards millions of requests.
        self._log: deque | None = deque(maxlen=log_size) if log_size else None
        self._logged = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.url = ""

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen and serve from a thread of its own; returns self once ``url`` is set."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, *self.listen, backlog=BACKLOG, limit=COPY_SIZE * 4)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        """Stop listening, drop every connection, end the thread."""
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- faults (any thread) -----------------------------------------------------------

    def set_rtt(self, rtt: float, jitter: float = 0.0) -> None:
        """Add ``rtt`` seconds (plus or minus up to ``jitter``) to every request."""
        with self._lock:
            self._rtt, self._jitter = rtt, jitter

    def blackhole(self) -> None:
        self._set_mode(Mode("blackhole"))

    def reset(self, share: float = 1.0) -> None:
        self._set_mode(Mode("reset", share=share))

    def error(self, status: int = 503, code: str = "SlowDown", share: float = 1.0) -> None:
        self._set_mode(Mode("error", share=share, status=status, code=code))

    def slow_body(self, bytes_per_second: float) -> None:
        if bytes_per_second <= 0:
            raise ValueError(f"bytes_per_second must be positive, not {bytes_per_second}")
        self._set_mode(Mode("slow_body", bytes_per_second=bytes_per_second))

    def heal(self) -> None:
        """No fault from now on (connections lost in a blackhole stay lost). The rtt stays."""
        self._set_mode(Mode())

    def _set_mode(self, mode: Mode) -> None:
        if not 0.0 <= mode.share <= 1.0:
            raise ValueError(f"share must be within 0..1, not {mode.share}")
        with self._lock:
            self._mode = mode

    # -- counters (any thread) ---------------------------------------------------------

    def stats(self) -> dict:
        """``requests`` seen (control requests aside), ``methods`` {GET: n, ...}, ``faults``
        {blackhole, reset, error, slow_body: requests each was applied to},
        ``expect_continue`` (requests that waited for ``100 Continue``), ``in_flight``
        (requests whose head arrived and whose answer is not complete), ``max_in_flight``,
        ``connections`` open now and ``max_connections``."""
        with self._lock:
            return {
                "requests": self._counts["requests"], "methods": dict(self._methods), "faults": dict(self._faults),
                "expect_continue": self._counts["expect_continue"],
                "in_flight": self._in_flight, "max_in_flight": self._max_in_flight,
                "connections": self._counts["connections"], "max_connections": self._counts["max_connections"],
            }

    def completed(self, since: int = 0) -> dict:
        """The request log from sequence number ``since`` on: ``entries`` [[time, method,
        path, status], ...] of requests forwarded upstream and answered whole, with the time
        (``time.time()``) the server's answer arrived (before the return half of the round
        trip: when a PUT's object became visible in the store), path with its query string; ``next``, the ``since`` of the
        next call; ``dropped``, entries after ``since`` already pushed out of the bounded log.
        Empty unless the proxy was made with ``log_size``."""
        with self._lock:
            if self._log is None:
                return {"entries": [], "next": 0, "dropped": 0}
            first = self._logged - len(self._log)
            start = max(since, first)
            entries = [list(e) for e in list(self._log)[start - first:]] if start < self._logged else []
            return {"entries": entries, "next": self._logged, "dropped": start - since}

    def _note_completed(self, answered: float, method: str, path: str, status: int) -> None:
        if self._log is not None:
            with self._lock:
                self._log.append((answered, method, path, status))
                self._logged += 1

    def reset_stats(self) -> None:
        """Counters back to zero; the maxima start again from what is open now."""
        with self._lock:
            open_now = self._counts["connections"]
            self._counts = Counter(connections=open_now, max_connections=open_now)
            self._methods.clear()
            self._faults.clear()
            self._max_in_flight = self._in_flight

    def _note_fault(self, kind: str) -> None:
        with self._lock:
            self._faults[kind] += 1

    def _round_trip(self) -> float:
        """This request's round trip: rtt plus or minus up to jitter."""
        with self._lock:
            rtt, jitter = self._rtt, self._jitter
        return max(0.0, rtt + (self._random.uniform(-jitter, jitter) if jitter else 0.0))

    def _mode_drawn(self) -> tuple[Mode, bool]:
        """The mode now, and whether this request is in its share."""
        with self._lock:
            mode = self._mode
        return mode, self._random.random() < mode.share

    # -- serving (loop thread) -----------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        with self._lock:
            self._counts["connections"] += 1
            self._counts["max_connections"] = max(self._counts["max_connections"], self._counts["connections"])
        conn = Connection(reader, writer)
        try:
            while True:
                head = Head.parse(await reader.readuntil(b"\r\n\r\n"))
                if head.start[1].startswith(CONTROL_PREFIX):
                    keep = await self._control(conn, head)
                else:
                    keep = await self._exchange(conn, head)
                if not keep:
                    break
        except (Dropped, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                IndexError, OSError):
            pass  # the connection ends: dropped on purpose, or a side closed or spoke garbage
        except asyncio.CancelledError:
            pass  # closing the proxy; re-raised, asyncio's stream callback would log it as an error
        finally:
            conn.close()
            with self._lock:
                self._counts["connections"] -= 1
            self._connections.discard(task)

    async def _exchange(self, conn: Connection, request: Head) -> bool:
        """One request and its answer, faults applied; whether the connection is kept."""
        with self._lock:
            self._counts["requests"] += 1
            self._counts["expect_continue"] += request.has("expect", "100-continue")
            self._methods[request.start[0]] += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            await self._hold_if_blackholed(conn)
            rtt = self._round_trip()
            await asyncio.sleep(rtt / 2)
            await self._hold_if_blackholed(conn)
            mode, hit = self._mode_drawn()
            if mode.kind == "reset" and hit:
                self._note_fault("reset")
                abort_with_reset(conn.writer)
                raise Dropped
            if mode.kind == "error" and hit:
                return await self._answer_error(conn, request, mode, rtt / 2)
            if mode.kind == "slow_body":
                self._note_fault("slow_body")
            return await self._forward(conn, request, rtt / 2, mode.bytes_per_second)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _hold_if_blackholed(self, conn: Connection, body: asyncio.Future | None = None) -> None:
        """In a blackhole the connection is lost: never answered, whatever the mode becomes
        later, and ended only when the client gives up on it (what it sends is dropped).
        ``body`` is the relay of the request's body, stopped first: one reader at a time."""
        with self._lock:
            held = self._mode.kind == "blackhole"
        if not held:
            return
        self._note_fault("blackhole")
        conn.close_upstream()
        if body is not None:
            body.cancel()
            await asyncio.wait([body])
        while await conn.reader.read(COPY_SIZE):
            pass
        raise Dropped

    async def _answer_error(self, conn: Connection, request: Head, mode: Mode, delay: float) -> bool:
        self._note_fault("error")
        waits_for_continue = request.has("expect", "100-continue")
        if not waits_for_continue:  # read the body the client sends anyway, keep the connection
            await copy_body(conn.reader, Sink(keep=False), request.body_framing())
        await asyncio.sleep(delay)
        request_id = f"faultproxy-{self._random.getrandbits(48):012x}"
        conn.writer.write(error_answer(request.start[0], mode.status, mode.code, request_id,
                                       keep_alive=not waits_for_continue))
        await conn.writer.drain()
        return not waits_for_continue

    async def _forward(self, conn: Connection, request: Head, delay: float, bytes_per_second: float) -> bool:
        """Send the request upstream and relay the answer; whether the connection is kept."""
        up_reader, up_writer = await conn.upstream(*self.upstream)
        up_writer.write(request.raw)
        # The body is relayed alongside the answer: with Expect: 100-continue it follows the
        # server's 100, and a server may answer before reading it all.
        body = asyncio.ensure_future(copy_body(conn.reader, up_writer, request.body_framing()))
        continued = False
        try:
            while True:
                response = Head.parse(await up_reader.readuntil(b"\r\n\r\n"))
                if int(response.start[1]) >= 200:
                    break
                if not continued:  # the first 100 Continue: its way back, the body's way out
                    await asyncio.sleep(2 * delay)  # (a server may send more than one)
                    continued = True
                conn.writer.write(response.raw)
                await conn.writer.drain()
            answered = time.time()  # the store has done the request: a PUT's object is visible
            await asyncio.sleep(delay)
            await self._hold_if_blackholed(conn, body)
            framing = response_framing(request.start[0], response)
            upstream_closes = response.has("connection", "close") or framing[0] == "eof"
            conn.writer.write(response.without_connection_close() if framing[0] != "eof" else response.raw)
            await copy_body(up_reader, conn.writer, framing, bytes_per_second)
            self._note_completed(answered, request.start[0], request.start[1], int(response.start[1]))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as e:
            conn.close_upstream()
            raise Dropped from e
        finally:
            body_sent = body.done() and not body.cancelled() and body.exception() is None
            body.cancel()  # a body the client never sent, as after an answer without 100 Continue
        if upstream_closes or not body_sent:
            conn.close_upstream()
        return body_sent and framing[0] != "eof" and not request.has("connection", "close")

    async def _control(self, conn: Connection, request: Head) -> bool:
        """The control channel: POST /__proxy__/<method> {kwargs}, GET /__proxy__/stats."""
        sink = Sink()
        await copy_body(conn.reader, sink, request.body_framing())
        name, _, query = request.start[1][len(CONTROL_PREFIX):].partition("?")
        try:
            if request.start[0] == "GET" and name == "stats":
                status, answer = 200, self.stats()
            elif request.start[0] == "GET" and name == "log":
                status, answer = 200, self.completed(int(urllib.parse.parse_qs(query).get("since", ["0"])[0]))
            elif request.start[0] == "POST" and name in CONTROL_METHODS:
                getattr(self, name)(**json.loads(bytes(sink.data) or b"{}"))
                status, answer = 200, {}
            else:
                status, answer = 404, {"error": f"no control route {request.start[0]} {request.start[1]}"}
        except (TypeError, ValueError) as e:
            status, answer = 400, {"error": str(e)}
        body = json.dumps(answer).encode()
        conn.writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: application/json"
                          f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await conn.writer.drain()
        return True


def control(url: str, name: str, **kwargs) -> dict:
    """Call the control channel of the proxy at ``url`` from another process:
    ``control(url, "error", status=503, share=0.7)``, ``control(url, "stats")``,
    ``control(url, "log", since=0)``."""
    if name == "stats":
        req = urllib.request.Request(f"{url}{CONTROL_PREFIX}stats")
    elif name == "log":
        req = urllib.request.Request(f"{url}{CONTROL_PREFIX}log?since={int(kwargs.get('since', 0))}")
    else:
        req = urllib.request.Request(f"{url}{CONTROL_PREFIX}{name}", data=json.dumps(kwargs).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as answer:
        return json.loads(answer.read())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.faultproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the S3 server's URL, http://HOST:PORT")
    parser.add_argument("--rtt", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--jitter", type=float, default=0.0, help="the rtt varies by up to this many seconds")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: a free one)")
    parser.add_argument("--log-size", type=int, default=0, help="keep a log of the last N requests forwarded")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with FaultProxy(args.upstream, (host, int(port)), rtt=args.rtt, jitter=args.jitter,
                    log_size=args.log_size) as proxy:
        print(proxy.url, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
