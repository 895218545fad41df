"""A real browser: a chat page on one origin calls azproxy on another, in headless Chromium.

The page (its own loopback port, so its own origin) sends `fetch` with `Authorization: Bearer` and JSON, which
makes Chromium send a CORS preflight first; it then reads the streamed answer with a stream reader, renders the
text as each chunk arrives and records when it did. azproxy answers only the page's origin
(`AZPROXY_CORS_ORIGINS`, the stricter set-up): the same page served from another port gets nothing, and Azure
is never called for it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from azproxy.browser import EXPOSED_HEADERS
from azproxy.emulator import Emulator

from .browser_driver import Page, chromium, chromium_binary
from .conftest import AZURE_KEY, SECRETS, ProxyFactory, ServerFactory

CLIENT_KEY = "sk-chromium-page-client-key-0001"
SECRETS.add(CLIENT_KEY)
CHUNKS = 6
CHUNK_DELAY = 0.25
#: Response headers the page reads: azproxy exposes the first three; Azure sends the last, which is not exposed.
READ = ("x-ratelimit-remaining-requests", "x-request-id", "x-azproxy-request-id", "x-ms-region")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>chat</title></head>
<body>
<input id="prompt" value="Hello from a browser">
<button id="send">Send</button>
<div id="answer"></div>
<script>
const API = %(api)s, KEY = %(key)s, READ = %(read)s;

async function send() {
  const answer = document.getElementById("answer");
  const record = {status: null, headers: {}, arrivals: [], done: false, error: null};
  const start = performance.now();
  try {
    const response = await fetch(API + "/v1/chat/completions", {
      method: "POST",
      headers: {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"},
      body: JSON.stringify({
        model: "gpt-4o", stream: true,
        messages: [{role: "user", content: document.getElementById("prompt").value}],
      }),
    });
    record.status = response.status;
    record.contentType = response.headers.get("content-type");
    for (const name of READ) record.headers[name] = response.headers.get(name);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\\n\\n");
      buffer = events.pop();
      for (const event of events) {
        for (const line of event.split("\\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") { record.done = true; continue; }
          for (const choice of JSON.parse(data).choices) {
            if (choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
          }
        }
      }
      record.arrivals.push({at: performance.now() - start, shown: answer.textContent});
    }
  } catch (error) {
    record.error = String(error);
  }
  record.text = answer.textContent;
  return record;
}

document.getElementById("send").addEventListener("click", () => { window.finished = send(); });
</script>
</body></html>
"""


@pytest.fixture
def emulator() -> Emulator:
    """Slow enough that each content chunk reaches the page on its own."""
    return Emulator(api_keys={AZURE_KEY}, chunks=CHUNKS, chunk_delay=CHUNK_DELAY)


@pytest.fixture
def browser_binary() -> str:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    return binary


async def page_server(start_server: ServerFactory, settings: dict[str, str]) -> TestServer:
    """Serves the chat page; `settings` (azproxy's URL) is filled in once azproxy has a port."""

    async def page(_request: web.Request) -> web.Response:
        values = {"api": json.dumps(settings["api"]), "key": json.dumps(CLIENT_KEY), "read": json.dumps(READ)}
        return web.Response(text=PAGE % values, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    return await start_server(app)


def origin_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def chat(page: Page, url: str) -> dict[str, Any]:
    await page.open(url)
    record: dict[str, Any] = await page.evaluate('document.getElementById("send").click(); window.finished')
    return record


def requests_to(page: Page, url: str) -> dict[str, dict[str, Any]]:
    """The page's requests to `url` as the Network domain saw them, by method (the preflight is the OPTIONS)."""
    sent = {event["requestId"]: event for event in page.events("Network.requestWillBeSent")}
    answered = {event["requestId"]: event for event in page.events("Network.responseReceived")}
    return {
        event["request"]["method"]: {
            "request": event["request"],
            "response": answered.get(request_id, {}).get("response"),
        }
        for request_id, event in sent.items()
        if event["request"]["url"] == url
    }


def header(headers: dict[str, str], name: str) -> str | None:
    return next((value for key, value in headers.items() if key.lower() == name), None)


@pytest.mark.timeout(90)
async def test_a_page_on_another_origin_streams_a_chat_through_azproxy(
    browser_binary: str,
    make_proxy: ProxyFactory,
    start_server: ServerFactory,
    emulator: Emulator,
    tmp_path: Path,
) -> None:
    settings: dict[str, str] = {}
    page_site = await page_server(start_server, settings)
    foreign_site = await page_server(start_server, settings)  # the same page, on an origin not answered
    origin = origin_of(page_site)
    proxy = await make_proxy(
        AZURE_OPENAI_TOKEN=AZURE_KEY, AZPROXY_API_KEYS=CLIENT_KEY, AZPROXY_CORS_ORIGINS=origin
    )
    settings["api"] = str(proxy.url).rstrip("/")
    endpoint = f"{settings['api']}/v1/chat/completions"

    # Generous bounds: a first Chromium start on a fresh machine (font and profile caches) can take seconds.
    async with (
        asyncio.timeout(60),
        chromium(browser_binary, tmp_path / "profile", start_timeout=30) as browser,
    ):
        page = await browser.new_page()
        record = await chat(page, f"{origin}/")

        # The page got its answer, could read the exposed headers and nothing unexposed.
        assert record["error"] is None, record
        assert record["status"] == 200
        assert record["contentType"].startswith("text/event-stream")
        assert record["done"] is True
        assert record["headers"]["x-ratelimit-remaining-requests"].isdigit()
        assert record["headers"]["x-request-id"]
        assert record["headers"]["x-ms-region"] is None  # sent by Azure, not exposed: the browser hides it

        # The text grew chunk by chunk, each one rendered as it arrived, about CHUNK_DELAY apart.
        arrivals = record["arrivals"]
        growth = [
            now
            for before, now in itertools.pairwise([{"shown": ""}, *arrivals])
            if now["shown"] != before["shown"]
        ]
        shown = [arrival["shown"] for arrival in growth]
        assert len(growth) >= CHUNKS - 1, arrivals
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(shown))
        assert shown[-1] == record["text"] != "", arrivals
        gaps = [later["at"] - earlier["at"] for earlier, later in itertools.pairwise(growth)]
        assert min(gaps) > CHUNK_DELAY * 1000 / 4, arrivals  # never bunched up
        assert growth[-1]["at"] - growth[0]["at"] > (len(growth) - 1) * CHUNK_DELAY * 1000 * 0.6, arrivals

        # Chromium sent a preflight and azproxy answered it for this origin; the streamed answer carries CORS.
        seen = requests_to(page, endpoint)
        assert set(seen) == {"OPTIONS", "POST"}, seen
        asked = seen["OPTIONS"]["request"]["headers"]
        assert header(asked, "access-control-request-method") == "POST"
        assert {"authorization", "content-type"} <= {
            name.strip() for name in header(asked, "access-control-request-headers").split(",")
        }
        preflight = seen["OPTIONS"]["response"]["headers"]
        assert header(preflight, "access-control-allow-origin") == origin
        allowed = {name.strip() for name in header(preflight, "access-control-allow-headers").split(",")}
        assert {"authorization", "content-type"} <= allowed
        answer = seen["POST"]["response"]["headers"]
        assert header(answer, "access-control-allow-origin") == origin
        assert "origin" in header(answer, "vary").lower()
        exposed = {name.strip() for name in header(answer, "access-control-expose-headers").split(",")}
        assert {"x-ratelimit-remaining-requests", "x-request-id"} <= exposed
        assert set(EXPOSED_HEADERS) <= exposed
        for name in ("x-ratelimit-remaining-requests", "x-request-id", "x-azproxy-request-id"):
            assert record["headers"][name] == header(answer, name)  # what the page read is what was sent
        assert header(answer, "x-azproxy-request-id") is not None
        assert len(emulator.received) == 1
        assert emulator.last.headers["api-key"] == AZURE_KEY

        # The same page from an origin azproxy does not answer: the preflight is refused, Azure never called.
        foreign = await browser.new_page()
        refused = await chat(foreign, f"{origin_of(foreign_site)}/")
        tried = requests_to(foreign, endpoint)
        assert tried["OPTIONS"]["response"]["status"] == 403
        assert header(tried["OPTIONS"]["response"]["headers"], "access-control-allow-origin") is None
        assert tried["POST"]["response"] is None  # never answered: the browser stopped at the preflight
        (failed,) = foreign.events("Network.loadingFailed")
        assert failed["corsErrorStatus"]["corsError"].startswith("Preflight"), failed
        assert refused["status"] is None
        assert "Failed to fetch" in refused["error"]
        assert refused["text"] == ""
        assert len(emulator.received) == 1
