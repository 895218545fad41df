"""azproxy's processes: one that serves, or (AZPROXY_WORKERS > 1) a parent supervising workers that share the port.

With one worker the server runs in the main process itself: no parent, no pipe, nothing forked. With several,
the parent makes what must exist once (the local CA), forks the workers, and then only supervises: each worker
builds its own app and event loop, listens on the port with SO_REUSEPORT (the kernel spreads connections over
them), and tells the parent through a pipe when it listens or why it cannot. The parent restarts a worker that
dies (with a back-off, so a crash loop does not spin), passes a reload on, and on SIGTERM or SIGINT has them all
drain and exits once they have. Only the main process talks to systemd.

Reloading (SIGHUP, or `azproxy reload` through the pid file in the state directory): the settings are read again
(the .env file, the config file, the clients file) and new requests use them at once, while requests under way
finish on the snapshot they started with. A new configuration that does not load is refused with one error line
and the old one stays. What cannot change without a restart (`RESTART_ONLY`) keeps its old value, named in a
warning. With workers, the parent reads the settings first (so a refusal or a warning is logged once, and a
worker it restarts later starts on the new ones), then forwards SIGHUP and tells systemd READY=1 once every
worker has reported its reload through its pipe.

Draining: the listening socket closes at once (new connections are refused), requests and streams under way
may finish for AZPROXY_SHUTDOWN_GRACE seconds, then the rest are closed. Keep-alive connections and intercepted
tunnels close after their current request; blind tunnels, whose requests azproxy cannot see, at the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import selectors
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path
from typing import Final, NoReturn, Protocol

from aiohttp import web

from .config import Mode, Settings
from .listener import DRAINING, start_server
from .metrics import forget_worker_metrics
from .server import build_app, metrics_app, new_event_loop, reload_app, tls_context
from .settings_table import SETTINGS
from .state_dir import StateDirError, check_state_dir
from .systemd import Notifier

log = logging.getLogger(__name__)

#: Python's default gen-0 threshold (700) runs a collection every few requests; at this one a worker collects a
#: few times a second under load. The numbers are the benchmark's to measure, not settled.
GC_THRESHOLDS: Final = (50_000, 20, 20)
#: Seconds before restarting a worker that died: its how-manieth quick death in a row picks the delay.
RESTART_DELAYS: Final = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: A worker that served this many seconds before it died starts the back-off from the beginning again.
STABLE_AFTER: Final = 30.0
#: Seconds after the grace period before the parent kills a worker that still has not exited.
KILL_MARGIN: Final = 10.0
_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
_PARENT_SIGNALS: Final = (signal.SIGCHLD, signal.SIGHUP, *_STOP_SIGNALS)
#: The serving (main) process's pid, in the state directory, for `azproxy reload`.
PID_FILE: Final = "azproxy.pid"
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


def run(settings: Settings, controls: Controls) -> None:
    """Serve until SIGTERM or SIGINT, then drain; raises StartupError if azproxy cannot start."""
    notifier, reload_settings = controls.notifier, controls.reload_settings
    metrics_dir = controls.metrics_dir
    if settings.access.allow_anonymous and settings.has_server_credential and not settings.access.clients:
        log.warning(
            "AZPROXY_ALLOW_ANONYMOUS=true: anyone who reaches %s spends this Azure credential",
            settings.address,
        )
    # SIGHUP means "reload"; until the serving loop handles it, it must not kill a server.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pid_file = settings.state_dir / PID_FILE
    try:
        if settings.workers == 1:
            _check_state_dir(settings)  # cheaply: the CA itself is made on the first intercepted tunnel
            with _pid_file(pid_file), asyncio.Runner(loop_factory=new_event_loop) as runner:
                main = _MainProcess(settings, notifier)
                runner.run(_serve(settings, main, reuse_port=False, reload_settings=reload_settings))
        else:
            new_ca = _make_shared(settings)  # first: a state directory it cannot use stops start-up
            with _pid_file(pid_file):
                supervisor = _Supervisor(
                    settings,
                    notifier,
                    new_ca=new_ca,
                    reload_settings=reload_settings,
                    metrics_dir=metrics_dir,
                )
                supervisor.run()
    finally:
        notifier.close()


@contextmanager
def _pid_file(path: Path) -> Iterator[None]:
    """Where `azproxy reload` finds this process; removed at exit unless another azproxy has taken it over. A
    state directory that cannot hold it costs only `azproxy reload` (SIGHUP still works), so it is a warning."""
    pid = str(os.getpid())
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(pid + "\n")
    except OSError as exc:
        log.warning(
            "cannot write %s (%s): azproxy reload will not find this process", path, exc.strerror or exc
        )
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == pid:
                path.unlink()


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


def _read_new_settings(
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


class _Lifecycle(Protocol):
    """Who is told when a serving process listens, reloads and starts draining."""

    def listening(self) -> None: ...

    def reloading(self) -> None: ...

    def reloaded(self) -> None: ...

    def draining(self) -> None: ...


async def _serve(
    settings: Settings,
    lifecycle: _Lifecycle,
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
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    context = _tls(settings)
    app = build_app(settings, metrics_dir=metrics_dir)
    _tune_gc()
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
        lifecycle: _Lifecycle,
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
                new = _read_new_settings(self._settings, self._reload_settings, warn=self._warn)
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


def _tune_gc() -> None:
    """Everything alive once the app is built lives as long as the process: freeze it out of every collection
    (which also keeps pages shared with the parent), and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _serving_status(settings: Settings) -> str:
    scheme = "https" if settings.tls_cert else "http"
    count = settings.workers
    return f"serving on {scheme}://{settings.address} with {count} worker{'s' if count > 1 else ''}"


class _MainProcess:
    """The one serving process is also the main one: it logs, tells systemd and feeds its watchdog itself."""

    def __init__(self, settings: Settings, notifier: Notifier) -> None:
        self._settings = settings
        self._notifier = notifier
        self._interval = notifier.watchdog_interval

    def listening(self) -> None:
        status = _serving_status(self._settings)
        log.info("azproxy %s mode %s", self._settings.mode, status)
        self._notifier.ready(status)
        if self._interval is not None:
            asyncio.get_running_loop().call_later(self._interval, self._ping)

    def reloading(self) -> None:
        self._notifier.reloading("reloading the configuration")

    def reloaded(self) -> None:
        self._notifier.ready(_serving_status(self._settings))

    def draining(self) -> None:
        grace = self._settings.shutdown_grace
        log.info("stopping: no new connections; finishing requests under way (up to %g s)", grace)
        self._notifier.stopping(f"draining for up to {grace:g} s")

    def _ping(self) -> None:
        self._notifier.watchdog()
        assert self._interval is not None
        asyncio.get_running_loop().call_later(self._interval, self._ping)


def _check_state_dir(settings: Settings) -> None:
    """A state directory that cannot hold the CA is found at start-up, not on the first CONNECT."""
    if settings.mode is not Mode.AZURE or not settings.forward.intercept_hosts:
        return
    try:
        check_state_dir(settings.state_dir)
    except StateDirError as exc:
        raise StartupError(f"AZPROXY_STATE_DIR: {exc}") from None


def _make_shared(settings: Settings) -> Path | None:
    """What must exist once is made before any worker starts: the local CA, when tunnels may be intercepted (its
    creation is safe across processes anyway, but a broken state directory should stop start-up). Returns the
    certificate's path if it had to be made (clients must then be told to trust it)."""
    if settings.mode is not Mode.AZURE or not settings.forward.intercept_hosts:
        return None
    from .edge.certs import CertificateAuthority, CertificateError

    try:
        authority = CertificateAuthority(settings.state_dir, settings.forward.intercept_hosts)
    except CertificateError as exc:
        raise StartupError(f"AZPROXY_STATE_DIR: {exc}") from None
    except (OSError, ValueError) as exc:
        raise StartupError(
            f"AZPROXY_STATE_DIR: cannot load the local CA in {settings.state_dir} ({exc})"
        ) from None
    return authority.cert_path if authority.created else None


@dataclass(slots=True)
class _Worker:
    """One forked worker, as the parent knows it."""

    slot: int
    pid: int
    #: The read end of the worker's pipe: `ready`, or `error MESSAGE`, one line each.
    pipe: int
    started: float
    #: The supervisor's reload count when it was forked: one forked before the last reload must reload too.
    generation: int = 0
    ready: bool = False
    error: str | None = None
    received: bytes = b""


class _Reporter:
    """A worker's side of its pipe."""

    def __init__(self, pipe: int) -> None:
        self._pipe = pipe

    def listening(self) -> None:
        self._say("ready")

    def reloading(self) -> None:
        """The parent told systemd already: it forwarded the signal."""

    def reloaded(self) -> None:
        self._say("reloaded")

    def draining(self) -> None:
        """The parent told systemd already: it sent the signal."""

    def failed(self, message: str) -> None:
        self._say(f"error {message}")

    def _say(self, line: str) -> None:
        os.write(self._pipe, line.replace("\n", " ").encode() + b"\n")


class _Supervisor:
    """The parent of several workers: starts them, restarts the ones that die, drains them all on request."""

    def __init__(
        self,
        settings: Settings,
        notifier: Notifier,
        *,
        new_ca: Path | None,
        reload_settings: ReloadSettings | None = None,
        metrics_dir: Path | None = None,
    ) -> None:
        self._settings = settings
        self._notifier = notifier
        self._new_ca = new_ca
        self._reload_settings = reload_settings
        self._metrics_dir = metrics_dir
        #: Successful reloads so far; workers forked since start on the settings of the last one.
        self._generation = 0
        #: Workers told to reload that have not reported back yet (systemd hears READY=1 when none is left).
        self._reloading: set[int] = set()
        self._workers: dict[int, _Worker] = {}
        #: Quick deaths in a row, per slot.
        self._failures = [0] * settings.workers
        #: Slots waiting to be restarted, and when.
        self._restarts: dict[int, float] = {}
        self._serving = False
        self._draining = False
        self._kill_at: float | None = None
        self._interval = notifier.watchdog_interval
        self._next_ping = time.monotonic() + (self._interval or 0)
        self._selector = selectors.DefaultSelector()
        self._wakeup, self._wakeup_write = os.pipe()
        os.set_blocking(self._wakeup, False)
        os.set_blocking(self._wakeup_write, False)
        self._selector.register(self._wakeup, selectors.EVENT_READ)

    def run(self) -> None:
        previous = {sig: signal.signal(sig, _note_signal) for sig in _PARENT_SIGNALS}
        signal.set_wakeup_fd(self._wakeup_write)
        try:
            for slot in range(self._settings.workers):
                self._spawn(slot)
            while self._workers or (self._restarts and not self._draining):
                self._step()
        finally:
            self._kill_all()
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._selector.close()
            os.close(self._wakeup)
            os.close(self._wakeup_write)

    def _step(self) -> None:
        now = time.monotonic()
        deadlines = [*self._restarts.values()]
        if self._interval is not None:
            deadlines.append(self._next_ping)
        if self._kill_at is not None:
            deadlines.append(self._kill_at)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        for key, _ in self._selector.select(timeout):
            if key.fd == self._wakeup:
                self._signals()
            elif key.data is not None and self._selector.get_map().get(key.fd) is key:
                # (a worker reaped earlier in this batch has had its pipe closed, or its descriptor reused)
                self._read(key.data)
        self._timers(time.monotonic())

    def _signals(self) -> None:
        try:
            received = os.read(self._wakeup, 512)
        except BlockingIOError:
            return
        for number in received:
            if number == signal.SIGCHLD:
                self._reap()
            elif number == signal.SIGHUP:
                self._reload()
            elif number in _STOP_SIGNALS:
                self._drain()

    def _reload(self) -> None:
        """Read the settings once here (a refusal or a warning is logged once), then let every listening worker
        reload itself; one still starting is told once it listens (see `_ready`)."""
        if self._reload_settings is None or self._draining:
            return
        self._notifier.reloading("reloading the configuration")
        new = _read_new_settings(self._settings, self._reload_settings)
        if new is not None:
            self._settings = new
            self._generation += 1
            for worker in self._workers.values():
                if worker.ready:
                    self._tell_reload(worker)
        self._reloaded()

    def _tell_reload(self, worker: _Worker) -> None:
        worker.generation = self._generation
        self._reloading.add(worker.pid)
        os.kill(worker.pid, signal.SIGHUP)

    def _reloaded(self, pid: int | None = None) -> None:
        """`pid` reported its reload (or died); READY=1 once no worker is left reloading."""
        if pid is not None:
            if pid not in self._reloading:
                return
            self._reloading.discard(pid)
        if not self._reloading and self._serving and not self._draining:
            self._notifier.ready(_serving_status(self._settings))

    def _timers(self, now: float) -> None:
        if self._interval is not None and now >= self._next_ping:
            self._notifier.watchdog()
            self._next_ping = now + self._interval
        for slot, due in list(self._restarts.items()):
            if now >= due:
                del self._restarts[slot]
                self._spawn(slot)
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            for worker in self._workers.values():
                log.warning(
                    "worker %d (pid %d) is still busy after the grace period: killing it", *_who(worker)
                )
                os.kill(worker.pid, signal.SIGKILL)

    def _spawn(self, slot: int) -> None:
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        # Signals wait until the child has put its own handlers in place (pending ones are not inherited).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
        pid = os.fork()
        if pid == 0:
            os.close(read)
            self._become_worker(write, blocked)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(write)
        worker = self._workers[pid] = _Worker(slot, pid, read, time.monotonic(), self._generation)
        self._selector.register(read, selectors.EVENT_READ, worker)

    def _become_worker(self, pipe: int, mask: set[int | signal.Signals]) -> NoReturn:
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, *_STOP_SIGNALS):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self._selector.close()
            for fd in (self._wakeup, self._wakeup_write, *(w.pipe for w in self._workers.values())):
                os.close(fd)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            reporter = _Reporter(pipe)
            try:
                with asyncio.Runner(loop_factory=new_event_loop) as runner:
                    runner.run(
                        _serve(
                            self._settings,
                            reporter,
                            reuse_port=True,
                            reload_settings=self._reload_settings,
                            warn=False,
                            metrics_dir=self._metrics_dir,
                        )
                    )
                status = 0
            except StartupError as exc:
                reporter.failed(str(exc))
                status = 2
        except BaseException:
            log.exception("worker failed")
        finally:
            logging.shutdown()
            os._exit(status)

    def _read(self, worker: _Worker) -> None:
        data = os.read(worker.pipe, 4096)
        if not data:
            self._selector.unregister(worker.pipe)
            return
        *lines, worker.received = (worker.received + data).split(b"\n")
        for line in lines:
            kind, _, message = line.decode(errors="replace").partition(" ")
            if kind == "ready":
                self._ready(worker)
            elif kind == "reloaded":
                self._reloaded(worker.pid)
            elif kind == "error":
                worker.error = message
                if not self._serving and not self._draining:
                    raise StartupError(message)
                log.error("worker %d (pid %d) could not start: %s", *_who(worker), message)

    def _ready(self, worker: _Worker) -> None:
        worker.ready = True
        status = _serving_status(self._settings)
        if worker.generation < self._generation and not self._draining:
            self._tell_reload(worker)  # forked on the settings before a reload that happened while it started
        if self._serving:
            log.info("worker %d (pid %d) listening", *_who(worker))
            self._notifier.status(status)
        elif all(w.ready for w in self._workers.values()) and not self._draining:
            self._serving = True
            log.info("azproxy %s mode %s", self._settings.mode, status)
            if self._new_ca is not None:
                log.info("made a new local CA: %s (azproxy ca says how clients trust it)", self._new_ca)
            self._notifier.ready(status)

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.pop(pid, None)
            if self._metrics_dir is not None:
                forget_worker_metrics(self._metrics_dir, pid)
            if worker is not None:
                self._exited(worker, wait_status)
                self._reloaded(pid)

    def _exited(self, worker: _Worker, wait_status: int) -> None:
        self._drain_pipe(worker)
        code = os.waitstatus_to_exitcode(wait_status)
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        if self._draining:
            if code != 0:
                log.warning("worker %d (pid %d) ended with %s while draining", *_who(worker), how)
            return
        if not self._serving:
            raise StartupError(worker.error or f"AZPROXY_WORKERS: a worker ended ({how}) before it listened")
        now = time.monotonic()
        slot = worker.slot
        quick = worker.error is not None or now - worker.started < STABLE_AFTER
        self._failures[slot] = self._failures[slot] + 1 if quick else 1
        delay = RESTART_DELAYS[min(self._failures[slot] - 1, len(RESTART_DELAYS) - 1)]
        log.warning("worker %d (pid %d) ended (%s); restarting it in %g s", *_who(worker), how, delay)
        self._notifier.status(f"{_serving_status(self._settings)}; restarting worker {slot}")
        self._restarts[slot] = now + delay

    def _drain_pipe(self, worker: _Worker) -> None:
        """The rest of what a dead worker wrote (its error, say): its end is closed, so this cannot block."""
        if worker.pipe in self._selector.get_map():
            self._selector.unregister(worker.pipe)
            while data := os.read(worker.pipe, 4096):
                worker.received += data
            for line in worker.received.split(b"\n"):
                kind, _, message = line.decode(errors="replace").partition(" ")
                if kind == "error":
                    worker.error = message
        os.close(worker.pipe)

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        self._restarts.clear()
        grace = self._settings.shutdown_grace
        log.info("stopping: the workers finish requests under way (up to %g s)", grace)
        self._notifier.stopping(f"draining for up to {grace:g} s")
        for worker in self._workers.values():
            os.kill(worker.pid, signal.SIGTERM)
        self._kill_at = time.monotonic() + grace + KILL_MARGIN

    def _kill_all(self) -> None:
        """Start-up failed, or the supervisor itself did: no worker may outlive it."""
        for worker in self._workers.values():
            os.kill(worker.pid, signal.SIGKILL)
        for worker in list(self._workers.values()):
            os.waitpid(worker.pid, 0)
            del self._workers[worker.pid]
            os.close(worker.pipe)


def _note_signal(_number: int, _frame: object) -> None:
    """The signal's number reaches the supervisor through the wakeup pipe; nothing to do here."""


def _who(worker: _Worker) -> tuple[int, int]:
    return worker.slot, worker.pid
