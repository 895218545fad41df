"""Logging set-up, and the one place that keeps request bytes out of aiohttp's own log records."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Final, TextIO

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


#: The format of every log line azproxy serve writes, its access log's included.
LINE_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The most log bytes one write carries: PIPE_BUF, the size up to which a write to a pipe (docker's, the
#: journal's) is atomic, so the lines of several workers sharing stderr never interleave within a line.
MAX_PENDING: Final = 4096


def configure_logging(settings: Settings) -> None:
    """Lines to stderr in LINE_FORMAT, the access log's through a TurnBatchingHandler; like basicConfig, nothing
    changes where logging was configured already (an embedding program, a test runner)."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(level=settings.log_level, format=LINE_FORMAT)
    access = logging.getLogger("azproxy.access")
    handler = TurnBatchingHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    access.addHandler(handler)
    access.propagate = False


class TurnBatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes the lines of one event-loop turn together: under load many requests end in
    one turn, and their access-log lines then cost one write system call rather than one each. Lines still go
    out in order, within the turn that made them, and at once
    when no loop runs, before a write would pass MAX_PENDING bytes, or at exit (logging.shutdown flushes every
    handler)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._size = 0
        #: The loop whose current turn ends with a flush, if one is scheduled.
        self._flushing_on: asyncio.AbstractEventLoop | None = None
        #: `write_info`'s time stamp up to the second, and the second it is for.
        self._second = -1
        self._stamp = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # logging's own contract: a bad record is reported, never raised
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            self._add(line)

    def write_info(self, logger_name: str, message: str) -> None:
        """What `emit` writes for an INFO record of `logger_name` with `message`, in LINE_FORMAT, without the
        LogRecord, caller lookup and formatter a record costs (the access log's path: one line a request)."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        line = (
            f"{self._stamp},{int((now - second) * 1000):03d} INFO {logger_name}: {message}{self.terminator}"
        )
        with self.lock:  # type: ignore[union-attr]
            self._add(line)

    def _add(self, line: str) -> None:
        size = len(line) if line.isascii() else len(line.encode("utf-8", "surrogateescape"))
        if self._pending and self._size + size > MAX_PENDING:
            self.flush()  # whole lines only: one longer than MAX_PENDING goes alone, as it would unbatched
        self._pending.append(line)
        self._size += size
        if self._size >= MAX_PENDING:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: write now
            self.flush()
            return
        if self._flushing_on is not loop:  # a loop that ended before its turn did has not written them
            self._flushing_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flushing_on = None
            if self._pending:
                lines, self._pending, self._size = "".join(self._pending), [], 0
                try:
                    self.stream.write(lines)
                except (OSError, ValueError):  # stderr closed or gone: nothing else to tell
                    return
            super().flush()
