"""The streaming mock upstream: Azure OpenAI's chat completions as a raw asyncio protocol on uvloop.

No web framework: it parses the request head itself and writes prebuilt bytes, so it costs a few µs per
chunk and stays far from being the bottleneck (the harness measures it alone first; see README.md).

    python bench/upstream.py PORT [--chunks 40] [--delay 0.05]

Routes (POST, anything else 404): `/openai/deployments/{deployment}/chat/completions` (401 without `api-key`)
and `/openai/v1/chat/completions`. A body with `"stream": true` gets Azure-like SSE on chunked encoding: a
prompt-filter chunk, a role chunk, N content chunks DELAY s apart (the first at once), a finish chunk, the
usage chunk when the body asked for it (`include_usage`), `data: [DONE]`. Content chunk i carries
`"content":"w<i>@<t> "`, t being CLOCK_MONOTONIC in ms when it was written, so the client can tell how late
each chunk arrives and whether any is missing or out of order. Any other body gets a fixed chat completion.
Headers `x-mock-chunks` / `x-mock-delay` override the counts for one request.

`--fail-every N` makes it a throttled backend: every Nth chat request (counted over all connections) gets
Azure's 429 with `retry-after-ms: MS` (`--retry-after-ms`, default 0) instead. `GET /_mock/counts` answers
`{"200": n, "429": m}`: the chat requests answered each way since start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import time
from typing import Any

try:
    import uvloop
except ImportError:  # plain asyncio works, only slower
    uvloop = None  # type: ignore[assignment]

STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
CF = (
    '{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},'
    '"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}'
)
HEAD = (
    '"created":1732000000,"id":"chatcmpl-AZbench0123456789abcdefXYZ","model":"gpt-35-turbo-0125",'
    '"object":"chat.completion.chunk","system_fingerprint":"fp_0165350fbb"'
)
PREFILTER = (
    '{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
    f'[{{"prompt_index":0,"content_filter_results":{CF}}}]}}'
)
ROLE = (
    '{"choices":[{"content_filter_results":{},"delta":{"content":"","refusal":null,"role":"assistant"},'
    f'"finish_reason":null,"index":0,"logprobs":null}}],{HEAD}}}'
)
CONTENT = (
    f'{{"choices":[{{"content_filter_results":{CF},"delta":{{"content":"w%d@%.3f "}},"finish_reason":null,'
    f'"index":0,"logprobs":null}}],{HEAD}}}'
)
FINISH = (
    '{"choices":[{"content_filter_results":{},"delta":{},"finish_reason":"stop","index":0,"logprobs":null}],'
    f"{HEAD}}}"
)
USAGE = f'{{"choices":[],{HEAD},"usage":{{"completion_tokens":40,"prompt_tokens":29,"total_tokens":69}}}}'
CHAT = (
    '{"choices":[{"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"self_harm":'
    '{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":'
    '{"filtered":false,"severity":"safe"}},"finish_reason":"stop","index":0,"logprobs":null,"message":'
    '{"content":"Benchmarks of proxies mean something only when every contender is measured side by side, '
    'in one run, against the same fast upstream.","refusal":null,"role":"assistant"}}],"created":1732000000,'
    '"id":"chatcmpl-AZbench0123456789abcdefXYZ","model":"gpt-35-turbo-0125","object":"chat.completion",'
    '"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,'
    '"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,'
    '"severity":"safe"},"violence":{"filtered":false,"severity":"safe"},"jailbreak":{"filtered":false,'
    '"detected":false}}}],"system_fingerprint":"fp_0165350fbb","usage":{"completion_tokens":27,'
    '"prompt_tokens":29,"total_tokens":56}}'
)
AZURE_HEADERS = (
    b"apim-request-id: 6f1c0f5e-0000-4000-8000-000000000000\r\nx-ms-region: East US\r\n"
    b"x-ratelimit-remaining-requests: 119\r\nx-ratelimit-remaining-tokens: 119000\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(js: str) -> bytes:
    return b"data: " + js.encode() + b"\n\n"


def answer(status: str, body: str) -> bytes:
    data = body.encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n".encode()
        + AZURE_HEADERS
        + b"\r\n"
        + data
    )


OK = answer("200 OK", CHAT)
E401 = answer("401 Unauthorized", '{"error":{"code":"401","message":"Access denied: missing api-key"}}')
E429_BODY = (
    '{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI '
    'API version 2024-10-21 have exceeded token rate limit of your current AIServices S0 pricing tier."}}'
)
E404 = answer("404 Not Found", '{"error":{"code":"404","message":"Resource not found"}}')
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n"
    + AZURE_HEADERS
    + b"\r\n"
)
SSE_START = chunk(event(PREFILTER) + event(ROLE))
SSE_END = chunk(event(FINISH) + b"data: [DONE]\n\n") + b"0\r\n\r\n"
SSE_END_USAGE = chunk(event(FINISH) + event(USAGE) + b"data: [DONE]\n\n") + b"0\r\n\r\n"


def throttled(retry_after_ms: int) -> bytes:
    """Azure's 429, with `retry-after-ms` only (azproxy's cooldown then lasts exactly that)."""
    head, _, rest = answer("429 Too Many Requests", E429_BODY).partition(b"\r\n")
    return head + f"\r\nretry-after-ms: {retry_after_ms}\r\n".encode() + rest


class Conn(asyncio.Protocol):
    chunks, delay = 40, 0.05
    fail_every = 0  # every Nth chat request gets E429 (0: none)
    e429 = throttled(0)
    counts = {"200": 0, "429": 0}  # over all connections
    seen = 0

    def connection_made(self, transport: Any) -> None:
        self.t: Any = transport
        self.buf = b""
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()
        self.close_after = False
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer:
            self.timer.cancel()
        self.t = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.parse()

    def parse(self) -> None:
        while not self.busy and self.t:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].split(b"\r\n")
            try:
                method, target, _ = lines[0].split(b" ", 2)
            except ValueError:
                self.t.close()
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            rest = self.buf[end + 4 :]
            if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                body, used = dechunk(rest)
                if body is None:
                    return
                self.buf = rest[used:]
            else:
                n = int(headers.get(b"content-length", b"0") or 0)
                if len(rest) < n:
                    return
                body, self.buf = rest[:n], rest[n:]
            self.close_after = headers.get(b"connection", b"").lower() == b"close"
            self.handle(method, target.split(b"?", 1)[0], headers, body)

    def handle(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        if method == b"GET" and path == b"/_mock/counts":
            self.reply(answer("200 OK", json.dumps(Conn.counts)))
            return
        v1 = path == b"/openai/v1/chat/completions"
        deployment = path.startswith(b"/openai/deployments/") and path.endswith(b"/chat/completions")
        if method != b"POST" or not (v1 or deployment):
            self.reply(E404)
            return
        if not headers.get(b"api-key") and not (v1 and headers.get(b"authorization")):
            self.reply(E401)
            return
        Conn.seen += 1
        if self.fail_every and Conn.seen % self.fail_every == 0:
            Conn.counts["429"] += 1
            self.reply(self.e429)
            return
        Conn.counts["200"] += 1
        if not STREAM_RE.search(body):
            self.reply(OK)
            return
        self.n = int(headers.get(b"x-mock-chunks", 0) or self.chunks)
        self.d = float(headers.get(b"x-mock-delay", 0) or self.delay)
        self.end = SSE_END_USAGE if b'"include_usage"' in body else SSE_END
        self.busy, self.i, self.t0 = True, 0, self.loop.time()
        self.t.write(SSE_HEAD + SSE_START)
        self.tick()

    def tick(self) -> None:
        self.timer = None
        if not self.t:
            return
        if self.i < self.n:
            now = time.monotonic() * 1000
            self.t.write(chunk(event(CONTENT % (self.i, now))))
            self.i += 1
            if self.i < self.n:
                self.timer = self.loop.call_at(self.t0 + self.i * self.d, self.tick)
                return
        self.busy = False
        self.reply(self.end)
        if self.buf:
            self.parse()

    def reply(self, data: bytes) -> None:
        self.t.write(data)
        if self.close_after:
            self.t.close()


def dechunk(raw: bytes) -> tuple[bytes | None, int]:
    """The whole chunked body in `raw` and the bytes it used, or (None, 0) while incomplete."""
    out, pos = [], 0
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(raw[pos:eol].split(b";")[0], 16)
        if size == 0:
            end = raw.find(b"\r\n\r\n", eol)
            return (None, 0) if end < 0 else (b"".join(out), end + 4)
        if len(raw) < eol + 2 + size + 2:
            return None, 0
        out.append(raw[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--fail-every", type=int, default=0, help="answer 429 to every Nth chat request")
    ap.add_argument("--retry-after-ms", type=int, default=0, help="the 429's retry-after-ms")
    a = ap.parse_args()
    Conn.chunks, Conn.delay = a.chunks, a.delay
    Conn.fail_every, Conn.e429 = a.fail_every, throttled(a.retry_after_ms)
    if uvloop:
        uvloop.install()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Conn, "127.0.0.1", a.port, backlog=8192)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
