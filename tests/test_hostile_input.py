"""Hostile input: generated model names, headers and bodies through the translator and the live server.

Every answer must be a well-formed OpenAI-shaped error from azproxy (and then Azure saw nothing), or a correct
upstream call (Azure saw exactly the bytes sent, at the mapped deployment); never a 500, a traceback or a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from azproxy.backends import Backend
from azproxy.config import BUILTIN_MODEL_MAP, Mode, load_settings
from azproxy.emulator import Emulator
from azproxy.errors import ProxyError
from azproxy.listener import start_server
from azproxy.server import build_app
from azproxy.translate import IncomingRequest, UpstreamRequest, plan_request, to_upstream

from .conftest import AZURE_KEY

AZURE = Backend("azure", Mode.AZURE, URL("https://res.openai.azure.com"), "2024-10-21", BUILTIN_MODEL_MAP)
ERROR_FIELDS = {"message", "type", "param", "code"}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def incoming(body: bytes, headers: dict[str, str] | None = None) -> IncomingRequest:
    all_headers = CIMultiDictProxy(CIMultiDict({"Authorization": "Bearer k", **(headers or {})}))
    return IncomingRequest(
        "POST", "/v1/chat/completions", "/v1/chat/completions", URL("/").query, all_headers, body
    )


def translate(body: bytes) -> UpstreamRequest | ProxyError:
    request = incoming(body)
    try:
        return to_upstream(plan_request(request, Mode.AZURE), request, AZURE)
    except ProxyError as exc:
        return exc


@given(model=st.text(max_size=300))
def test_translator_model_names(model: str) -> None:
    body = json.dumps({"model": model}).encode()
    upstream = translate(body)
    if isinstance(upstream, ProxyError):
        assert 400 <= upstream.status < 500
        return
    assert upstream.url.host == "res.openai.azure.com"
    assert (
        upstream.url.raw_path == f"/openai/deployments/{AZURE.model_map.get(model, model)}/chat/completions"
    )
    assert upstream.url.query.getall("api-version") == ["2024-10-21"]
    assert upstream.body == body


@given(body=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
def test_translator_bodies(body: bytes) -> None:
    upstream = translate(body)
    if isinstance(upstream, ProxyError):
        assert 400 <= upstream.status < 500
        assert set(json.loads(upstream.to_response().body)["error"]) == ERROR_FIELDS  # type: ignore[arg-type]
        return
    assert upstream.body == body
    assert upstream.url.path.startswith("/openai/deployments/")


@dataclass
class Live:
    proxy: str
    emulator: Emulator


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """The emulator and azproxy on their own loop in a thread, so synchronous generated tests can drive them."""
    loop = asyncio.new_event_loop()
    emulator = Emulator(api_keys={AZURE_KEY})
    started: dict[str, Any] = {}

    async def start() -> None:
        emulator_runner, emulator_port = await start_server(emulator.app(), "127.0.0.1", 0, load_limits())
        settings = load_settings({"AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{emulator_port}"})
        proxy_runner, proxy_port = await start_server(build_app(settings), "127.0.0.1", 0, settings.limits)
        started.update(runners=[proxy_runner, emulator_runner], url=f"http://127.0.0.1:{proxy_port}")

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield Live(started["url"], emulator)
    finally:
        for runner in started["runners"]:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def load_limits() -> Any:
    return load_settings({"AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9"}).limits


def post_and_check(live: Live, sent: bytes, headers: dict[str, str] | None = None) -> None:
    """POST `sent` to chat completions through azproxy and check the answer (see the module docstring)."""
    before = len(live.emulator.received)
    with httpx.Client(timeout=30) as client:
        reply = client.post(
            f"{live.proxy}/v1/chat/completions",
            content=sent,
            headers={**(headers or {}), "Authorization": f"Bearer {AZURE_KEY}"},
        )
    check_answer(live, reply, sent, before)


def check_answer(live: Live, reply: httpx.Response, sent: bytes, calls_before: int) -> None:
    assert reply.status_code != 500, reply.text
    calls = live.emulator.received[calls_before:]
    if calls:
        assert len(calls) == 1
        assert calls[0].body == sent
        assert calls[0].path.startswith("/openai/deployments/")
        assert "Authorization" not in calls[0].headers
    else:
        assert 400 <= reply.status_code < 500
        assert set(reply.json()["error"]) == ERROR_FIELDS


HYPOTHESIS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@HYPOTHESIS
@given(
    model=st.one_of(st.text(max_size=80), json_values),
    stream=st.one_of(st.none(), json_values),
    extra=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
def test_live_json_bodies(live: Live, model: Any, stream: Any, extra: dict[str, Any]) -> None:
    document = {**extra, "model": model, "messages": [{"role": "user", "content": "x"}]}
    if stream is not None:
        document["stream"] = stream
    post_and_check(live, json.dumps(document).encode())


@HYPOTHESIS
@given(body=st.binary(max_size=2000))
def test_live_raw_bodies(live: Live, body: bytes) -> None:
    post_and_check(live, body)


header_text = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"), min_size=1, max_size=30
)


@HYPOTHESIS
@given(
    headers=st.dictionaries(
        header_text, st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200), max_size=8
    )
)
def test_live_headers(live: Live, headers: dict[str, str]) -> None:
    with contextlib.suppress(httpx.LocalProtocolError):  # the client itself refused to send such a header
        post_and_check(live, json.dumps({"model": "gpt-4o", "messages": []}).encode(), headers)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt-4o", "nested": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"[" * 1_000_000,
        b'{"model": "gpt-4o\xff\xfe", "messages": []}',
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + b"x" * 8_000_000 + b'"}]}',
        b'{"model": ["gpt-4o"]}',
        b'{"model": "gpt-4o", "stream": "yes"}',
        b'--boundary\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o\r\n--boundary--\r\n',
    ],
    ids=[
        "deep-nesting",
        "unclosed-nesting",
        "invalid-utf8",
        "huge-string",
        "model-list",
        "stream-string",
        "multipart",
    ],
)
def test_live_pathological_bodies(live: Live, body: bytes) -> None:
    post_and_check(live, body)
