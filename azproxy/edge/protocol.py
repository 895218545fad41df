"""aiohttp's per-connection request handler, with OpenAI-shaped answers to requests too malformed to route.

aiohttp answers those itself, in text/plain, quoting the offending bytes (which may hold a key). azproxy's
answer names only the kind of error. Every connection's handler is made here, the listener's and a tunnel's.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from azproxy.errors import error_response

log = logging.getLogger(__name__)


class _OpenAIErrorsHandler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        kind = type(exc).__name__ if exc is not None else "error"
        log.debug("malformed request refused: %s", kind)
        response = error_response(
            status,
            f"The request is not well-formed HTTP/1.1 ({kind}).",
            "invalid_request_error",
            code="malformed_request",
        )
        response.force_close()
        return response


def new_handler(server: web.Server) -> RequestHandler:
    """A request handler for one connection of `server`.

    aiohttp's Server offers no hook for the handler class; the subclass adds no state (empty __slots__), so
    re-classing the handler it makes is safe.
    """
    handler = server()
    handler.__class__ = _OpenAIErrorsHandler
    return handler
