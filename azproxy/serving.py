"""One serving process: it listens, serves the app, reloads it on SIGHUP and drains on SIGTERM or SIGINT.

It is either the main process (one worker) or one of the workers a supervisor forked (supervisor.py); either way
it reports its steps (listening, reloading, reloaded, draining) to a `Lifecycle`: systemd, or the parent's pipe.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path
from typing import Final, Protocol

from aiohttp import web

from .config import Settings
from .listener import DRAINING, start_server
from .server import build_app, metrics_app, reload_app, tls_context
from .settings_table import SETTINGS
from .systemd import Notifier

log = logging.getLogger(__name__)

#: Python's default gen-0 threshold (700) runs a collection every few requests; at this one a worker collects a
#: few times a second under load. With gc.freeze() after start-up, bench's gc scenario measured about 6 % less
#: CPU a request and a lower worst p99 than Python's defaults (bench/RESULTS.md).
GC_THRESHOLDS: Final = (50_000, 20, 20)

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

#: Settings a reload cannot change: what the listener, the routes and logging were made from, and what backs the
#: resources kept across reloads (the local CA, the rate-limit counters, the body budget, the stored owners).
RESTART_ONLY: Final = (
    "address",
    "tls_cert",
    "tls_key",
    "forward.intercept_hosts",
    "workers",
    "mode",
    "metrics",
    "metrics_address",
    "access_log",
    "log_level",
    "log_format",
    "state_dir",
    "shutdown_grace",
    "access.redis_url",
    "access.trusted_proxies",
    "limits.max_buffered",
    "limits.body_timeout",
    "limits.body_min_rate",
    "limits.max_header_size",
    "limits.max_headers",
    "limits.header_timeout",
    "limits.keepalive_timeout",
    "limits.max_connections",
    "limits.max_connections_per_ip",
)
_VARIABLE: Final = {row.field: row.env for row in SETTINGS if row.field}

#: Reads the settings again, from the same sources start-up read (only the command line may read the
#: environment); raises ConfigError for a configuration that does not load.
ReloadSettings = Callable[[], Settings]


class StartupError(Exception):
    """azproxy cannot start; the message, one line, names the setting first and then the cause."""


@dataclass(frozen=True, slots=True)
class Controls:
    """What the command line hands the serving process besides its settings."""

    notifier: Notifier
    #: How a reload reads the settings again; None: SIGHUP is ignored.
    reload_settings: ReloadSettings | None = None
    #: Where several workers keep their metrics so that any of them reports the whole server.
    metrics_dir: Path | None = None


def keep_restart_only(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """`new` with every setting a reload cannot change at its `old` value, and the variables of those that
    `new` would have changed."""
    changed = []
    for path in RESTART_ONLY:
        before, after = attrgetter(path)(old), attrgetter(path)(new)
        if before == after:
            continue
        changed.append(_VARIABLE[path])
        section, _, name = path.rpartition(".")
        if section:
            new = replace(new, **{section: replace(getattr(new, section), **{name: before})})
        else:
            new = replace(new, **{name: before})
    return new, changed


def read_new_settings(
    current: Settings, reload_settings: ReloadSettings, *, warn: bool = True
) -> Settings | None:
    """The settings a reload switches to, or None (with the one error line) when they do not load."""
    try:
        new = reload_settings()
    except Exception as exc:  # a ConfigError above all, but no reload may take the server down
        log.error("reload refused, the configuration in use stays: %s", exc)
        return None
    new, kept = keep_restart_only(current, new)
    if kept and warn:
        log.warning(
            "reload: %s changed, which only a restart applies; keeping the value in use", ", ".join(kept)
        )
    return new


class Lifecycle(Protocol):
    """Who is told when a serving process listens, reloads and starts draining."""

    def listening(self) -> None: ...

    def reloading(self) -> None: ...

    def reloaded(self) -> None: ...

    def draining(self) -> None: ...


async def serve(
    settings: Settings,
    lifecycle: Lifecycle,
    *,
    reuse_port: bool,
    reload_settings: ReloadSettings | None = None,
    warn: bool = True,
    metrics_dir: Path | None = None,
) -> None:
    """Listen, serve (reloading on SIGHUP) until SIGTERM or SIGINT, then drain. `warn=False`: a parent has
    already named the restart-only settings a reload would change."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    context = _tls(settings)
    app = build_app(settings, metrics_dir=metrics_dir)
    tune_gc()
    runner = await _listen(app, settings, context, reuse_port=reuse_port)
    metrics_runner = await _listen_for_metrics(app, settings, reuse_port=reuse_port)
    if reload_settings is not None:  # only now: a reload swaps what start-up made
        reloads = _Reloads(app, settings, lifecycle, reload_settings, warn=warn)
        loop.add_signal_handler(signal.SIGHUP, reloads.start)
    lifecycle.listening()
    await stop.wait()
    DRAINING.set()
    lifecycle.draining()
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()


async def _listen_for_metrics(
    app: web.Application, settings: Settings, *, reuse_port: bool
) -> web.AppRunner | None:
    """`/metrics` on AZPROXY_METRICS_ADDRESS, when that is set."""
    address = settings.metrics_address
    if not settings.metrics or address is None:
        return None
    try:
        runner, _ = await start_server(
            metrics_app(app), address.host, address.port, settings.limits, reuse_port=reuse_port
        )
    except OSError as exc:
        raise StartupError(
            f"AZPROXY_METRICS_ADDRESS: cannot listen on {address} ({exc.strerror or exc})"
        ) from None
    return runner


class _Reloads:
    """A serving process's reloads, one at a time: a SIGHUP during one is served by another right after it."""

    def __init__(
        self,
        app: web.Application,
        settings: Settings,
        lifecycle: Lifecycle,
        reload_settings: ReloadSettings,
        *,
        warn: bool,
    ) -> None:
        self._app = app
        self._settings = settings
        self._lifecycle = lifecycle
        self._reload_settings = reload_settings
        self._warn = warn
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if DRAINING.is_set():
            return
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        async with self._lock:
            self._lifecycle.reloading()
            try:
                new = read_new_settings(self._settings, self._reload_settings, warn=self._warn)
                if new is not None and not DRAINING.is_set():
                    try:
                        await reload_app(self._app, new)
                    except Exception as exc:  # a credential that cannot be made, say
                        log.error("reload refused, the configuration in use stays: %s", exc)
                    else:
                        self._settings = new
                        log.info("reloaded the configuration: new requests use it")
            finally:
                self._lifecycle.reloaded()


def _tls(settings: Settings) -> ssl.SSLContext | None:
    for name, path in (("AZPROXY_TLS_CERT", settings.tls_cert), ("AZPROXY_TLS_KEY", settings.tls_key)):
        if path is not None:
            try:
                path.open("rb").close()
            except OSError as exc:
                raise StartupError(f"{name}: cannot read {path} ({exc.strerror or exc})") from None
    try:
        return tls_context(settings)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise StartupError(
            f"AZPROXY_TLS_CERT: {settings.tls_cert} and {settings.tls_key} are not a PEM certificate and its "
            f"private key ({reason})"
        ) from None


async def _listen(
    app: web.Application, settings: Settings, context: ssl.SSLContext | None, *, reuse_port: bool
) -> web.AppRunner:
    address = settings.address
    try:
        runner, _ = await start_server(
            app,
            address.host,
            address.port,
            settings.limits,
            ssl_context=context,
            trusted_proxies=settings.access.trusted_proxies,
            reuse_port=reuse_port,
            shutdown_timeout=settings.shutdown_grace,
        )
    except OSError as exc:
        raise StartupError(f"AZURE_OPENAI_PROXY_ADDRESS: {_listen_failure(settings, exc)}") from None
    return runner


def _listen_failure(settings: Settings, exc: OSError) -> str:
    address = settings.address
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {address.host} ({exc.strerror})"
    if exc.errno == errno.EADDRINUSE:
        return f"{address} is already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{address.host} is not an address of this host"
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on {address} (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return f"cannot listen on {address} ({exc.strerror or exc})"


def tune_gc() -> None:
    """Everything alive once the app is built lives as long as the process: freeze it out of every collection
    (which also keeps pages shared with the parent), and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def serving_status(settings: Settings) -> str:
    scheme = "https" if settings.tls_cert else "http"
    count = settings.workers
    return f"serving on {scheme}://{settings.address} with {count} worker{'s' if count > 1 else ''}"
