"""The translator alone: pure functions, no server."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from azproxy.backends import Backend
from azproxy.config import BUILTIN_MODEL_MAP, ApiStyle, Mode, parse_model_map
from azproxy.errors import BadRequest, NotFound, ProxyError, Unauthorized
from azproxy.headers import HOP_BY_HOP, copy_headers
from azproxy.translate import IncomingRequest, plan_request, route, to_upstream

AZURE = Backend("azure", Mode.AZURE, URL("https://res.openai.azure.com"), "2024-10-21", BUILTIN_MODEL_MAP)
OPENAI = Backend("openai", Mode.OPENAI, URL("https://api.openai.com"), "2024-10-21", BUILTIN_MODEL_MAP)


def incoming(
    path: str = "/v1/chat/completions",
    body: object = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> IncomingRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body or {"model": "gpt-3.5-turbo"}).encode()
    url = URL(path)
    all_headers = CIMultiDict({"Authorization": "Bearer client-key", "Content-Type": "application/json"})
    all_headers.update(headers or {})
    return IncomingRequest(method, url.raw_path_qs, url.path, url.query, CIMultiDictProxy(all_headers), raw)


def translate(request: IncomingRequest, backend: Backend = AZURE):
    return to_upstream(plan_request(request, backend.kind), request, backend)


@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/v1/chat/completions", "chat/completions"),
        ("/chat/completions", "chat/completions"),
        ("/v1/completions", "completions"),
        ("/embeddings", "embeddings"),
    ],
)
def test_route_accepts_paths_with_and_without_v1(path: str, operation: str) -> None:
    assert route("POST", path).name == operation


def test_route_refuses_unknown_path_and_wrong_method() -> None:
    with pytest.raises(NotFound):
        route("POST", "/v1/unknown")
    with pytest.raises(ProxyError) as caught:
        route("GET", "/v1/chat/completions")
    assert caught.value.status == 405
    assert caught.value.headers == {"Allow": "POST"}


def test_chat_becomes_deployment_url_with_api_key() -> None:
    upstream = translate(incoming())
    assert str(upstream.url) == (
        "https://res.openai.azure.com/openai/deployments/gpt-35-turbo/chat/completions?api-version=2024-10-21"
    )
    assert upstream.headers["api-key"] == "client-key"
    assert "Authorization" not in upstream.headers
    assert upstream.body == json.dumps({"model": "gpt-3.5-turbo"}).encode()


def test_api_key_header_from_client_is_used() -> None:
    request = incoming(headers={"Authorization": "", "api-key": "k2"})
    assert translate(request).headers.getall("api-key") == ["k2"]


def test_server_credential_overrides_client_key() -> None:
    request = incoming()
    upstream = to_upstream(plan_request(request, Mode.AZURE), request, AZURE, {"api-key": "server-key"})
    assert upstream.headers.getall("api-key") == ["server-key"]
    assert "Authorization" not in upstream.headers


def test_missing_key_is_refused_before_any_call() -> None:
    with pytest.raises(Unauthorized):
        translate(incoming(headers={"Authorization": "Basic abc"}))


def test_client_api_version_replaces_default_and_other_query_is_kept() -> None:
    upstream = translate(incoming("/v1/chat/completions?x=1&api-version=2024-06-01&api-version=2025-01-01"))
    assert upstream.url.query.getall("api-version") == ["2024-06-01"]
    assert upstream.url.query["x"] == "1"


def test_hop_by_hop_and_openai_account_headers_are_dropped() -> None:
    request = incoming(
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "OpenAI-Organization": "org-1",
            "Cookie": "a=b",
            "Host": "localhost",
            "Content-Length": "24",
            "x-ms-client-request-id": "abc",
        }
    )
    headers = translate(request).headers
    for name in (
        "Connection",
        "X-Hop",
        "Keep-Alive",
        "TE",
        "Proxy-Authorization",
        "OpenAI-Organization",
        "Cookie",
        "Host",
        "Content-Length",
    ):
        assert name not in headers
    assert headers["x-ms-client-request-id"] == "abc"


def test_mapper_and_passthrough() -> None:
    backend = Backend("azure", Mode.AZURE, AZURE.base_url, "v", parse_model_map("gpt-4o=my-4o"))
    assert translate(incoming(body={"model": "gpt-4o"}), backend).url.path.split("/")[3] == "my-4o"
    assert translate(incoming(body={"model": "gpt-4.1-mini"})).url.path.split("/")[3] == "gpt-4.1-mini"
    fine_tune = "ft:gpt-4o-mini:org:custom:abc123"
    assert translate(incoming(body={"model": fine_tune})).url.path.split("/")[3] == fine_tune


@pytest.mark.parametrize("model", ["../admin", "a/b", "a?b", "a#b", "a%2Fb", "x\r\ny", ".hidden", "", " gpt"])
def test_model_can_never_change_the_upstream_path(model: str) -> None:
    with pytest.raises(BadRequest) as caught:
        translate(incoming(body={"model": model}))
    assert caught.value.param == "model"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b'{"messages": []}', "missing_model"),
        (b'{"model": 4}', "invalid_model"),
    ],
)
def test_bad_bodies_get_clear_errors(body: bytes, code: str) -> None:
    with pytest.raises(BadRequest) as caught:
        translate(incoming(body=body))
    assert caught.value.code == code


def test_openai_mode_relays_path_query_auth_and_body_unchanged() -> None:
    request = incoming("/v1/anything/else?a=1", body=b"raw bytes", headers={"Connection": "close"})
    upstream = translate(request, OPENAI)
    assert str(upstream.url) == "https://api.openai.com/v1/anything/else?a=1"
    assert upstream.headers["Authorization"] == "Bearer client-key"
    assert upstream.body == b"raw bytes"
    assert "Connection" not in upstream.headers


V1 = Backend(
    "azure",
    Mode.AZURE,
    URL("https://res.openai.azure.com"),
    "2024-10-21",
    {"gpt-4o": "prod-4o"},
    style=ApiStyle.V1,
)


def test_fine_tuning_names_a_base_model_never_a_deployment() -> None:
    job = incoming("/v1/fine_tuning/jobs", {"model": "gpt-4o", "training_file": "file-1"})
    assert json.loads(translate(job, V1).body)["model"] == "gpt-4o"
    answer = incoming("/v1/responses", {"model": "gpt-4o", "input": "x"})
    assert (
        json.loads(translate(answer, V1).body)["model"] == "prod-4o"
    )  # other resource operations are mapped


def test_openai_mode_reads_the_model_but_keeps_the_body() -> None:
    request = incoming(body={"model": "gpt-3.5-turbo", "stream": True})
    plan = plan_request(request, Mode.OPENAI, stream_usage=True)
    assert plan.model == "gpt-3.5-turbo"
    assert not plan.adds_stream_usage  # openai mode relays bodies unchanged
    assert translate(request, OPENAI).body == request.body
    assert plan_request(incoming("/v1/some/future/api", {"x": 1}), Mode.OPENAI).model is None


@pytest.mark.parametrize(
    ("body", "sent_options"),
    [
        (b'{"model": "gpt-4o", "stream": true}', {"include_usage": True}),
        (b'{"model":"gpt-4o","stream":true,"stream_options":{"x":1}}', {"x": 1, "include_usage": True}),
        (b'{"model":"gpt-4o","stream":true,"stream_options":null}', {"include_usage": True}),
        (b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}', None),
        (b'{"model":"gpt-4o","stream":false}', None),
        (b'{"model":"gpt-4o"}', None),
    ],
)
def test_streams_ask_for_usage_the_client_did_not(body: bytes, sent_options: object) -> None:
    request = incoming(body=body)
    plan = plan_request(request, Mode.AZURE, stream_usage=True)
    sent = to_upstream(plan, request, AZURE).body
    assert plan.adds_stream_usage is (sent_options is not None)
    if sent_options is None:
        assert sent == body
    else:
        document = json.loads(sent)
        assert document.pop("stream_options") == sent_options
        assert document == {k: v for k, v in json.loads(body).items() if k != "stream_options"}
        assert sent.count(b'"stream_options"') == 1


def test_a_key_offered_as_subprotocol_is_never_forwarded() -> None:
    headers = CIMultiDictProxy(
        CIMultiDict({"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.sk-secret", "X-Other": "1"})
    )
    copied = copy_headers(headers, HOP_BY_HOP)
    assert copied["Sec-WebSocket-Protocol"] == "realtime"
    only_key = copy_headers(
        CIMultiDictProxy(CIMultiDict({"Sec-WebSocket-Protocol": "openai-insecure-api-key.k"})), HOP_BY_HOP
    )
    assert "Sec-WebSocket-Protocol" not in only_key
