"""Python load clients of the bench: closed-loop non-streamed chat (optionally through a CONNECT tunnel), and
bursts of concurrent streams with per-chunk lateness.

Both are raw asyncio protocols on uvloop, so the client takes as little of the machine as it can. Each run
prints one JSON object on stdout.

    python bench/client.py plain URL --connections 64 --duration 10 -H 'Authorization: Bearer KEY'
    python bench/client.py plain https://api.openai.com/v1/chat/completions --proxy 127.0.0.1:8080 --ca ca.pem
    python bench/client.py stream URL --streams 1000 --chunks 40 -H 'api-key: KEY'

`plain --group-by HEADER` (repeatable) also counts the 200s, and takes their latency percentiles, per value of
that response header (e.g. `x-azproxy-backend`, `x-azproxy-attempts`), each header on its own.
`--proxy` makes every connection go to the proxy, send `CONNECT host:443`, then speak TLS (trusting only
`--ca`) to the URL's host inside the tunnel: the URL's host is never resolved or contacted.
Stream chunks come from bench/upstream.py, whose content chunk i reads `w<i>@<ms>` (CLOCK_MONOTONIC when the mock
wrote it): lateness is arrival minus that, and a chunk whose index is not the next expected one is reordered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import ssl
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast
from urllib.parse import urlsplit

try:
    import uvloop
except ImportError:  # plain asyncio works too, only slower
    uvloop = None  # type: ignore[assignment]

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write one sentence about proxies, please."},
]
# A streamed event carries content when its delta has a non-empty "content" (the role chunk's is "").
CONTENT_RE = re.compile(rb'"delta"\s*:\s*\{[^{}]*"content"\s*:\s*"([^"])')
MOCK_CHUNK_RE = re.compile(rb'"content"\s*:\s*"w(\d+)@([\d.]+) ')

HEAD, LENGTH, SIZE, DATA, CRLF, TRAILER, CLOSE = range(7)


def chat_body(model: str, stream: bool) -> dict[str, Any]:
    """The chat completion request every load of the benchmark sends."""
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 64}
    return {**body, "stream": True} if stream else body


def build_request(url: str, headers: Sequence[str], body: dict[str, Any]) -> tuple[str, int, bytes]:
    """Host, port and the raw HTTP/1.1 POST of `body` as JSON to `url` with extra `Name: value` headers."""
    u = urlsplit(url)
    data = json.dumps(body).encode()
    target = u.path + (f"?{u.query}" if u.query else "")
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {u.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        *headers,
    ]
    return (
        u.hostname or "127.0.0.1",
        u.port or (443 if u.scheme == "https" else 80),
        ("\r\n".join(lines) + "\r\n\r\n").encode() + data,
    )


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile in ms, rounded to µs; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 3)


class HttpClient(asyncio.Protocol):
    """Incremental HTTP/1.1 response reader: hands body bytes to `body()` as they arrive (Content-Length,
    chunked or close-delimited) and calls `end()` after each complete response, keeping the connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.state = HEAD
        self.left = 0
        self.status = 0
        self.headers: dict[bytes, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        buf, pos = (self.buf + data if self.buf else data), 0
        while pos < len(buf) or (self.state == LENGTH and self.left == 0):
            if self.state == HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                self.head(buf[pos:end])
                pos = end + 4
            elif self.state in (LENGTH, DATA):
                piece = buf[pos : pos + self.left]
                pos += len(piece)
                self.left -= len(piece)
                if piece:
                    self.body(piece)
                if self.left == 0:
                    if self.state == LENGTH:
                        self.finish()
                    else:
                        self.state = CRLF
            elif self.state == CRLF:
                if len(buf) - pos < 2:
                    break
                pos, self.state = pos + 2, SIZE
            elif self.state in (SIZE, TRAILER):
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                line, pos = buf[pos:eol], eol + 2
                if self.state == TRAILER:
                    if not line:
                        self.finish()
                    continue
                self.left = int(line.split(b";", 1)[0], 16)
                self.state = DATA if self.left else TRAILER
            else:  # CLOSE: everything up to the end of the connection is body
                self.body(buf[pos:])
                pos = len(buf)
        self.buf = buf[pos:]

    def head(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        self.headers = headers
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            self.state = SIZE
        elif b"content-length" in headers:
            self.state, self.left = LENGTH, int(headers[b"content-length"])
        else:
            self.state = CLOSE

    def finish(self) -> None:
        self.state, self.left = HEAD, 0
        self.end()

    def body(self, data: bytes) -> None:
        """A piece of the current response's body."""

    def end(self) -> None:
        """The current response is complete."""


# ---------------------------------------------------------------- non-streamed, closed loop


class Tunnel:
    """How to reach the URL's host through a proxy: CONNECT, then TLS trusting only the proxy's CA."""

    def __init__(self, proxy: str, host: str, port: int, ca: str) -> None:
        self.host, _, port_s = proxy.rpartition(":")
        self.port = int(port_s)
        self.connect = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        self.server_hostname = host
        self.ctx = ssl.create_default_context(cafile=ca)


class PlainStats:
    """What the connections of one plain run share: the request, the deadline and the results."""

    def __init__(
        self, request: bytes, deadline: float, tunnel: Tunnel | None = None, group_by: Sequence[str] = ()
    ) -> None:
        self.request, self.deadline, self.tunnel = request, deadline, tunnel
        self.latencies_ms: list[float] = []
        self.errors: dict[str, int] = {}
        #: header -> its value (`-` when absent) -> latencies of the 200s carrying it
        self.groups: dict[str, dict[str, list[float]]] = {h.lower(): {} for h in group_by}
        self.group_by = [h.encode() for h in self.groups]

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class PlainConn(HttpClient):
    """One keep-alive connection sending the request again as soon as the previous answer is complete."""

    def __init__(self, stats: PlainStats, closed: asyncio.Future[None]) -> None:
        super().__init__()
        self.stats, self.closed = stats, closed
        self.sent_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # start_tls does not call it again, but be safe
            return
        super().connection_made(transport)
        if self.stats.tunnel is None:
            self.send()
        else:
            self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.state = CLOSE  # until the CONNECT answer: see data_received
            cast(asyncio.Transport, transport).write(self.stats.tunnel.connect)

    def data_received(self, data: bytes) -> None:
        if self.stats.tunnel is not None and not self.handshake.done():
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                ok = self.buf.split(b" ", 2)[1:2] == [b"200"]
                self.buf, self.state = b"", HEAD
                if ok:
                    self.handshake.set_result(None)
                else:
                    self.handshake.set_exception(OSError(0, "CONNECT refused"))
            return
        super().data_received(data)

    async def open_tunnel(self) -> None:
        """After the CONNECT's 200: TLS inside the tunnel, then the first request."""
        tunnel = self.stats.tunnel
        assert tunnel is not None
        assert self.transport is not None
        await self.handshake
        loop = asyncio.get_running_loop()
        tls = await loop.start_tls(
            self.transport, self, tunnel.ctx, server_hostname=tunnel.server_hostname, ssl_handshake_timeout=10
        )
        self.transport = cast(asyncio.Transport, tls)
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.stats.request)

    def end(self) -> None:
        assert self.sent_at is not None
        assert self.transport is not None
        now = time.perf_counter()
        if self.status == 200:
            ms = (now - self.sent_at) * 1000
            self.stats.latencies_ms.append(ms)
            for name, by in zip(self.stats.group_by, self.stats.groups.values(), strict=True):
                by.setdefault(self.headers.get(name, b"-").decode(), []).append(ms)
        else:
            self.stats.error(f"HTTP {self.status}")
        self.sent_at = None
        if now < self.stats.deadline:
            self.send()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sent_at is not None:
            self.stats.error(f"connection lost ({exc or 'closed'})")
        if not self.closed.done():
            self.closed.set_result(None)


async def plain_worker(host: str, port: int, stats: PlainStats, grace: float) -> None:
    """Keeps one connection busy until the deadline (an answer may take `grace` s more), reconnecting after a
    failure."""
    loop = asyncio.get_running_loop()
    if stats.tunnel is not None:
        host, port = stats.tunnel.host, stats.tunnel.port
    while time.perf_counter() < stats.deadline:
        closed: asyncio.Future[None] = loop.create_future()
        try:
            transport, conn = await loop.create_connection(partial(PlainConn, stats, closed), host, port)
            if stats.tunnel is not None:
                await asyncio.wait_for(conn.open_tunnel(), 10)
        except (OSError, ssl.SSLError) as e:
            stats.error(f"connect: {e.strerror or e}")
            await asyncio.sleep(0.05)
            continue
        try:
            await asyncio.wait_for(closed, stats.deadline - time.perf_counter() + grace)
        except TimeoutError:
            if conn.sent_at is not None:
                stats.error("timeout")
                conn.sent_at = None
            transport.abort()
            return


async def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    host, port, request = build_request(args.url, args.header, chat_body(args.model, stream=False))
    tunnel = Tunnel(args.proxy, host, port, args.ca) if args.proxy else None
    start = time.perf_counter()
    stats = PlainStats(request, start + args.duration, tunnel, args.group_by)
    await asyncio.gather(*(plain_worker(host, port, stats, args.timeout) for _ in range(args.connections)))
    wall = time.perf_counter() - start
    lat = stats.latencies_ms
    return {
        "requests": len(lat),
        "rps": round(len(lat) / wall, 1),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "errors": sum(stats.errors.values()),
        "error_kinds": stats.errors,
        **({"groups": {h: groups(by) for h, by in stats.groups.items()}} if args.group_by else {}),
    }


def groups(by: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {
        value: {"requests": len(lat), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)}
        for value, lat in sorted(by.items())
    }


# ---------------------------------------------------------------- streamed


class StreamConn(HttpClient):
    """One stream: POSTs the request on connect, counts SSE content events, notes when the first one and
    `[DONE]` arrive."""

    def __init__(self, request: bytes, done: Callable[[StreamConn], None]) -> None:
        super().__init__()
        self.request, self.done = request, done
        self.started = time.perf_counter()
        self.sse = b""
        self.chunks = 0
        self.reordered = 0
        self.late_ms: list[float] = []
        self.first_at: float | None = None
        self.done_at: float | None = None
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        cast(asyncio.Transport, transport).write(self.request)

    def body(self, data: bytes) -> None:
        if self.status != 200:
            return
        self.sse += data.replace(b"\r\n", b"\n") if b"\r" in data else data
        while (end := self.sse.find(b"\n\n")) >= 0:
            event, self.sse = self.sse[:end], self.sse[end + 2 :]
            if event.startswith(b"data: [DONE]"):
                self.done_at = time.perf_counter()
            elif mock := MOCK_CHUNK_RE.search(event):
                if int(mock.group(1)) != self.chunks:
                    self.reordered += 1
                self.late_ms.append(time.monotonic() * 1000 - float(mock.group(2)))
                self.chunks += 1
                if self.first_at is None:
                    self.first_at = time.perf_counter()
            elif CONTENT_RE.search(event):
                self.chunks += 1
                if self.first_at is None:
                    self.first_at = time.perf_counter()

    def end(self) -> None:
        if self.error is None and self.status != 200:
            self.error = f"HTTP {self.status}"
        elif self.error is None and self.done_at is None:
            self.error = "no [DONE]"
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == CLOSE:  # a close-delimited body ends with the connection
            self.end()
        elif self.state != HEAD or self.status == 0:
            self.error = self.error or f"connection lost ({exc or 'closed'})"
        self.done(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def stream_round(host: str, port: int, request: bytes, n: int, limit_s: float) -> list[StreamConn]:
    """Opens `n` streams at once and waits (at most `limit_s` s) for all of them to end."""
    loop = asyncio.get_running_loop()
    pending: set[StreamConn] = set()
    all_done: asyncio.Future[None] = loop.create_future()

    def done(conn: StreamConn) -> None:
        pending.discard(conn)
        if not pending and not all_done.done():
            all_done.set_result(None)

    async def one() -> StreamConn:
        conn = StreamConn(request, done)
        pending.add(conn)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, host, port), limit_s)
        except OSError as e:  # TimeoutError included
            conn.error = f"connect: {e.strerror or str(e) or 'timeout'}"
            done(conn)
        return conn

    conns = await asyncio.gather(*(one() for _ in range(n)))
    try:
        await asyncio.wait_for(asyncio.shield(all_done), limit_s)
    except TimeoutError:
        for conn in list(pending):
            conn.error = "timeout"
            conn.close()
    return conns


async def run_stream(args: argparse.Namespace) -> dict[str, Any]:
    host, port, request = build_request(args.url, args.header, chat_body(args.model, stream=True))
    if args.warmup:
        await stream_round(host, port, request, args.warmup, args.timeout)
    conns: list[StreamConn] = []
    start = time.perf_counter()
    for _ in range(args.rounds):
        conns += await stream_round(host, port, request, args.streams, args.timeout)
    wall = time.perf_counter() - start
    ok = [c for c in conns if c.error is None]
    ttfc = [(c.first_at - c.started) * 1000 for c in ok if c.first_at is not None]
    total = [(c.done_at - c.started) * 1000 for c in ok if c.done_at is not None]
    kinds: dict[str, int] = {}
    for c in conns:
        if c.error is not None:
            kinds[c.error] = kinds.get(c.error, 0) + 1
    received = sum(c.chunks for c in conns)
    late = [x for c in conns for x in c.late_ms]
    return {
        "streams": len(conns),
        "errors": len(conns) - len(ok),
        "error_kinds": kinds,
        "chunks_received": received,
        "chunks_lost": sum(max(0, args.chunks - c.chunks) for c in conns),
        "chunks_reordered": sum(c.reordered for c in conns),
        "late_p50_ms": percentile(late, 50),
        "late_p99_ms": percentile(late, 99),
        "late_max_ms": percentile(late, 100),
        "late_over_50ms": sum(1 for x in late if x > 50),
        "ttfc_p50_ms": percentile(ttfc, 50),
        "ttfc_p99_ms": percentile(ttfc, 99),
        "total_p50_ms": percentile(total, 50),
        "total_p99_ms": percentile(total, 99),
        "chunks_per_s": round(received / wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("mode", choices=["plain", "stream"])
    ap.add_argument("url")
    ap.add_argument("-H", "--header", action="append", default=[], help="extra request header 'Name: value'")
    ap.add_argument("--model", default="gpt-3.5-turbo")
    ap.add_argument("--timeout", type=float, default=30, help="seconds a request or round may overrun")
    ap.add_argument("--connections", type=int, default=64, help="plain: concurrent keep-alive connections")
    ap.add_argument("--duration", type=float, default=10, help="plain: seconds of load")
    ap.add_argument(
        "--group-by",
        action="append",
        default=[],
        help="plain: count answers and their latency per value of this response header (repeatable)",
    )
    ap.add_argument(
        "--proxy", help="plain: HOST:PORT of a proxy to CONNECT through (then TLS to the URL's host)"
    )
    ap.add_argument("--ca", help="plain, with --proxy: the CA file the TLS inside the tunnel must chain to")
    ap.add_argument("--streams", type=int, default=200, help="stream: concurrent streams per round")
    ap.add_argument("--chunks", type=int, default=40, help="stream: content chunks each stream should carry")
    ap.add_argument("--rounds", type=int, default=1, help="stream: measured rounds, one after another")
    ap.add_argument("--warmup", type=int, default=0, help="stream: streams in one unmeasured round first")
    args = ap.parse_args()
    if uvloop is not None:
        uvloop.install()
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = asyncio.run(run_plain(args) if args.mode == "plain" else run_stream(args))
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["client_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
