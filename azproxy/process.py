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
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from .config import Mode, Settings
from .server import new_event_loop
from .serving import Controls, StartupError, serve, serving_status
from .state_dir import StateDirError, check_state_dir
from .supervisor import Supervisor
from .systemd import Notifier

log = logging.getLogger(__name__)

#: The serving (main) process's pid, in the state directory, for `azproxy reload`.
PID_FILE: Final = "azproxy.pid"


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
                runner.run(serve(settings, main, reuse_port=False, reload_settings=reload_settings))
        else:
            new_ca = _make_shared(settings)  # first: a state directory it cannot use stops start-up
            with _pid_file(pid_file):
                supervisor = Supervisor(
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


class _MainProcess:
    """The one serving process is also the main one: it logs, tells systemd and feeds its watchdog itself."""

    def __init__(self, settings: Settings, notifier: Notifier) -> None:
        self._settings = settings
        self._notifier = notifier
        self._interval = notifier.watchdog_interval

    def listening(self) -> None:
        status = serving_status(self._settings)
        log.info("azproxy %s mode %s", self._settings.mode, status)
        self._notifier.ready(status)
        if self._interval is not None:
            asyncio.get_running_loop().call_later(self._interval, self._ping)

    def reloading(self) -> None:
        self._notifier.reloading("reloading the configuration")

    def reloaded(self) -> None:
        self._notifier.ready(serving_status(self._settings))

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
