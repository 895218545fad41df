"""OpenAI-shaped errors: the exceptions azproxy raises and the JSON bodies clients receive for them."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


class ProxyError(Exception):
    """A refusal azproxy answers itself; subclasses fix the status and OpenAI's `type`."""

    status = 500
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def to_response(self) -> web.Response:
        return error_response(self.status, self.message, self.error_type, self.code, self.param, self.headers)

    def to_event(self) -> bytes:
        """The error as one final SSE event, for failures after a stream has started."""
        return b"data: " + error_body(self.message, self.error_type, self.code, self.param) + b"\n\n"


class BadRequest(ProxyError):
    status = 400
    error_type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    error_type = "invalid_request_error"


class Forbidden(ProxyError):
    status = 403
    error_type = "permission_error"


class NotFound(ProxyError):
    status = 404
    error_type = "invalid_request_error"


class MethodNotAllowed(ProxyError):
    status = 405
    error_type = "invalid_request_error"


class ProxyAuthRequired(ProxyError):
    status = 407
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(
            message, code="proxy_auth_required", headers={"Proxy-Authenticate": 'Basic realm="azproxy"'}
        )


class PayloadTooLarge(ProxyError):
    status = 413
    error_type = "invalid_request_error"


class UnsupportedMediaType(ProxyError):
    """415: a body in a format the operation does not take."""

    status = 415
    error_type = "invalid_request_error"


class ServiceUnavailable(ProxyError):
    """503: azproxy itself cannot serve this now (its own state, not the client's request)."""

    status = 503
    error_type = "server_error"


class BadGateway(ProxyError):
    status = 502
    error_type = "upstream_error"


class GatewayTimeout(ProxyError):
    status = 504
    error_type = "upstream_error"


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> bytes:
    payload = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return json.dumps(payload).encode()


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(message, error_type, code, param),
        content_type="application/json",
        headers=headers,
    )


def from_http_exception(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (413, 405, ...) re-dressed in OpenAI's shape."""
    error_type = "invalid_request_error" if exc.status < 500 else "server_error"
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    return error_response(exc.status, exc.reason, error_type, code=str(exc.status), headers=headers)
