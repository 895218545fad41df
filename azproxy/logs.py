"""Logging set-up, and the one place that keeps request bytes out of aiohttp's own log records."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

from .config import Settings


class HideMalformedRequestBytes(logging.Filter):
    """aiohttp logs a malformed request with an excerpt of its bytes, which may hold a key or token: keep only
    what kind of error it was, at DEBUG level, since any client on the network can cause one."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg, record.args = "malformed request from a client: %s", (type(error).__name__,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_HIDE = HideMalformedRequestBytes()


def protect_server_log() -> None:
    """Idempotent: every app built in this process shares aiohttp's logger."""
    server_log = logging.getLogger("aiohttp.server")
    if _HIDE not in server_log.filters:
        server_log.addFilter(_HIDE)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
