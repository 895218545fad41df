"""The built-in Azure OpenAI emulator, used by the tests, `azproxy demo` and the benchmark.

Azure behaviours it reproduces, and where each is stated (learn.microsoft.com pages under
`azure/foundry/openai/`, the data-plane REST reference under `azure/foundry/reference/rest/`, and the REST specs
in `Azure/azure-rest-api-specs`, `specification/cognitiveservices/data-plane/AzureOpenAI/inference/`):

- Two URL styles, classic with a dated `api-version` and v1 without one: "Azure OpenAI API version lifecycle"
  (`app.py`, `versions.py`); api-version minimums per operation: the REST specs (`versions.py`).
- `api-key`, Entra bearer tokens, and on v1 the key as a bearer: "Azure OpenAI REST API reference",
  Authentication (`app.py`).
- 404 `DeploymentNotFound`, 400 `OperationNotSupported`: the REST specs' error examples (`deployments.py`).
- Content-filter fields, refusals and the filter-only first stream chunk: "Content filtering" and its
  "Content filtering annotations" page (`answers.py`).
- Asynchronous Filter annotation chunks (`content_filter_offsets`, no delta) mid-stream: "Content streaming",
  Asynchronous filtering (`answers.chat_stream`, switched on by `Emulator(async_filter=True)`).
- Reasoning deployments (o-series, gpt-5 family) refuse `max_tokens` and sampling parameters with 400
  `unsupported_parameter`: "Azure OpenAI reasoning models", Not supported parameters (`inference.py`).
- model-router names the model that served each answer: "Model router" concept page (`deployments.py`).
- gzip answers and sync-flushed SSE when asked (`Accept-Encoding: gzip`): HTTP content coding, RFC 9110 §8.4 and
  §12.5.3, as Azure's front end applies it (`app.py`, switched on by `Emulator(gzip=True)`).
- 429 with `retry-after` and `retry-after-ms`: "Azure OpenAI quotas and limits" (`app.Emulator.fail_next`).
- Responses API over WebSocket (`wss://.../openai/v1/responses`, `response.create`, one response per socket,
  60-minute connections, `websocket_connection_limit_reached`): "Use the Responses API in WebSocket mode", and
  OpenAI's "WebSocket mode" guide for the event and error shapes (`response_socket.py`).
- Realtime over WebSocket, classic (`/openai/realtime?api-version=&deployment=`) and v1
  (`/openai/v1/realtime?model=`): "Use the GPT Realtime API via WebSockets" (`realtime.py`).
- WebRTC set-up, `POST /openai/v1/realtime/client_secrets` and `POST /openai/v1/realtime/calls` (201, SDP
  answer, `Location`): "Use the GPT Realtime API via WebRTC" and the REST reference's "Create a Realtime call"
  (`webrtc.py`).
"""

from .app import Emulator, ReceivedRequest
from .deployments import DEFAULT_DEPLOYMENTS, Deployment
from .multipart import Form, UploadedFile
from .versions import API_VERSIONS

__all__ = [
    "API_VERSIONS",
    "DEFAULT_DEPLOYMENTS",
    "Deployment",
    "Emulator",
    "Form",
    "ReceivedRequest",
    "UploadedFile",
]
