"""Command line: `azproxy [serve]`, `azproxy reload`, `azproxy check`, `azproxy health`, `azproxy demo`,
`azproxy emulator`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import (
    FLAG_VARIABLES,
    Address,
    ConfigError,
    Settings,
    load_settings,
    parse_address,
    read_sources,
    unknown_variables,
)
from .logs import configure_logging
from .process import PID_FILE, run
from .server import new_event_loop
from .serving import Controls, StartupError
from .settings_table import SETTINGS
from .systemd import Notifier, NotifyEnvironment

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(_default_to_serve(sys.argv[1:] if argv is None else list(argv)))
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"azproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _serve(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name) for name in FLAG_VARIABLES}
    source = read_sources(os.environ, flags)
    settings = load_settings(source)
    configure_logging(settings)
    unknown = unknown_variables(source)
    if unknown:
        log.warning("ignoring variables no setting reads (typos?): %s", ", ".join(unknown))
    environ = os.environ
    notify = NotifyEnvironment.from_text(
        environ.get("NOTIFY_SOCKET"), environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    )

    def reload_settings() -> Settings:
        """What a reload switches to: the same sources, the .env and config files read again."""
        return load_settings(read_sources(os.environ, flags))

    metrics_dir = _metrics_dir(settings)
    try:
        run(settings, Controls(Notifier(notify), reload_settings, metrics_dir))
    except StartupError as exc:
        print(f"azproxy: {exc}", file=sys.stderr)
        return 2
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _metrics_dir(settings: Settings) -> Path | None:
    """With several workers, prometheus-client's multi-process mode: every worker writes its metrics to files in
    one fresh directory, and whichever answers /metrics reports them all."""
    if settings.workers == 1 or not settings.metrics:
        return None
    directory = Path(tempfile.mkdtemp(prefix="azproxy-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def _reload(_args: argparse.Namespace) -> int:
    """SIGHUP to the azproxy these settings describe, found through the pid file in its state directory."""
    settings = load_settings(read_sources(os.environ), require_endpoint=False)
    path = settings.state_dir / PID_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        print(
            f"azproxy: not running: no {path} (AZPROXY_STATE_DIR names another directory?)", file=sys.stderr
        )
        return 1
    try:
        pid = int(text)
        if not _is_azproxy(pid):
            raise ProcessLookupError
        os.kill(pid, signal.SIGHUP)
    except ValueError:
        print(f"azproxy: {path} holds no process id", file=sys.stderr)
        return 1
    except ProcessLookupError:
        print(f"azproxy: not running: {path} names process {pid}, which is no azproxy now", file=sys.stderr)
        return 1
    except PermissionError:
        print(
            f"azproxy: not allowed to signal process {pid} (run as the user azproxy runs as)", file=sys.stderr
        )
        return 1
    print(f"azproxy: asked process {pid} to reload its configuration (the log says how it went)")
    return 0


def _is_azproxy(pid: int) -> bool:
    """Whether `pid` still runs azproxy: a pid file left by a killed azproxy may name a process that has since
    taken its number, and SIGHUP would end most programs. Without /proc, the pid file is trusted."""
    try:
        return b"azproxy" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(run_demo(_address(args.address), once=args.once))


def _emulator(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .emulator import Emulator

    address = _address(args.address)
    emulator = Emulator(api_keys=args.api_key, chunks=args.chunks, chunk_delay=args.chunk_delay, record=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    web.run_app(
        emulator.app(),
        host=address.host,
        port=address.port,
        loop=new_event_loop(),
        handler_cancellation=True,
        access_log=None,
        backlog=1024,  # hundreds of streams may open at once in a benchmark
        print=lambda _: logging.info("Azure OpenAI emulator on http://%s", address),
    )
    return 0


def _ca(args: argparse.Namespace) -> int:
    from .edge.certs import CertificateAuthority

    settings = load_settings(read_sources(os.environ), require_endpoint=False)
    authority = CertificateAuthority(settings.state_dir, settings.forward.intercept_hosts)
    if authority.created:  # on stderr, so `azproxy ca --pem > ca.pem` stays a clean certificate
        print(
            f"azproxy: there was no CA in {settings.state_dir}; made a new one: clients must trust it",
            file=sys.stderr,
        )
    if args.pem:
        sys.stdout.write(authority.pem().decode())
        return 0
    path = authority.cert_path
    print(f"""azproxy's CA certificate: {path}
It may sign only: {", ".join(authority.hosts)}

Make HTTPS_PROXY clients trust it:
  Python (openai, httpx):  export SSL_CERT_FILE={path}
  requests:                export REQUESTS_CA_BUNDLE={path}
  Node:                    export NODE_EXTRA_CA_CERTS={path}
  curl:                    curl --cacert {path} -x http://AZPROXY:8080 https://api.openai.com/...
  Debian/Ubuntu system:    cp {path} /usr/local/share/ca-certificates/azproxy.crt && update-ca-certificates
(SSL_CERT_FILE and REQUESTS_CA_BUNDLE replace the default trust store: to keep it, point them at a bundle
holding both, e.g. cat "$(python3 -m certifi)" {path} > bundle.pem)""")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import run_check
    from .config import Secret

    try:
        settings = load_settings(read_sources(os.environ))
        key = None
        if args.key_env:
            value = os.environ.get(args.key_env, "").strip()
            if not value:
                raise ConfigError(f"--key-env: the variable {args.key_env} is not set")
            key = Secret(value)
    except ConfigError as exc:
        if not args.json:
            raise
        print(json.dumps({"ok": False, "error": f"configuration error: {exc}"}))
        return 2
    return run_check(settings, key=key, timeout=args.timeout, json_output=args.json)


def _health(args: argparse.Namespace) -> int:
    from .check import healthy

    settings = load_settings(read_sources(os.environ), require_endpoint=False)
    return 0 if asyncio.run(healthy(settings, args.timeout)) else 1


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ConfigError as exc:
        raise ConfigError(f"--address: {exc}") from None


def _default_to_serve(argv: list[str]) -> list[str]:
    commands = {"serve", "reload", "check", "health", "demo", "emulator", "ca", "-h", "--help", "--version"}
    return argv if argv and argv[0] in commands else ["serve", *argv]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="azproxy", description="OpenAI-compatible proxy for Azure OpenAI.")
    parser.add_argument("--version", action="version", version=f"azproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy (the default command)")
    for row in SETTINGS:
        if row.flag:
            meaning = row.meaning.replace("`", "").replace("%", "%%")
            serve.add_argument(row.flag, help=f"{meaning} ({row.env})")
    serve.set_defaults(func=_serve)

    reload = commands.add_parser(
        "reload", help="make the running azproxy read its configuration again (SIGHUP through its pid file)"
    )
    reload.set_defaults(func=_reload)

    demo = commands.add_parser(
        "demo", help="the proxy in front of the built-in Azure emulator, with requests"
    )
    demo.add_argument(
        "--address", default="127.0.0.1:8080", help="where the proxy listens (default %(default)s)"
    )
    demo.add_argument(
        "--once", action="store_true", help="exit after the demo requests instead of serving on"
    )
    demo.set_defaults(func=_demo)

    emulator = commands.add_parser("emulator", help="run the built-in Azure OpenAI emulator alone")
    emulator.add_argument("--address", default="127.0.0.1:8081", help="default %(default)s")
    emulator.add_argument("--api-key", action="append", default=[], help="accepted key (default: any)")
    emulator.add_argument("--chunks", type=int, help="content chunks per stream (default: one per word)")
    emulator.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between stream chunks")
    emulator.set_defaults(func=_emulator)

    check = commands.add_parser("check", help="one cheap real call per configured model: is each one usable?")
    check.add_argument("--json", action="store_true", help="print the results as JSON, for scripts")
    check.add_argument("--timeout", type=float, default=10, help="seconds per call (default %(default)s)")
    check.add_argument(
        "--key-env",
        metavar="NAME",
        help="a variable holding an Azure key to check with when no AZURE_OPENAI_TOKEN is set",
    )
    check.set_defaults(func=_check)

    health = commands.add_parser("health", help="exit 0 if the configured azproxy answers /healthz (Docker)")
    health.add_argument("--timeout", type=float, default=3, help="seconds (default %(default)s)")
    health.set_defaults(func=_health)

    ca = commands.add_parser("ca", help="where azproxy's CA certificate is and how to trust it")
    ca.add_argument("--pem", action="store_true", help="print the CA certificate itself")
    ca.set_defaults(func=_ca)
    return parser
