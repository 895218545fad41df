"""Command line: `azproxy [serve]`, `azproxy demo`, `azproxy emulator`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from .config import (
    FLAG_VARIABLES,
    Address,
    ConfigError,
    load_settings,
    parse_address,
    read_sources,
    unknown_variables,
)
from .logs import configure_logging
from .server import new_event_loop, run
from .settings_table import SETTINGS

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
    source = read_sources(os.environ, {name: getattr(args, name) for name in FLAG_VARIABLES})
    settings = load_settings(source)
    configure_logging(settings)
    unknown = unknown_variables(source)
    if unknown:
        log.warning("ignoring variables no setting reads (typos?): %s", ", ".join(unknown))
    run(settings)
    return 0


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


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ConfigError as exc:
        raise ConfigError(f"--address: {exc}") from None


def _default_to_serve(argv: list[str]) -> list[str]:
    commands = {"serve", "demo", "emulator", "ca", "-h", "--help", "--version"}
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

    ca = commands.add_parser("ca", help="where azproxy's CA certificate is and how to trust it")
    ca.add_argument("--pem", action="store_true", help="print the CA certificate itself")
    ca.set_defaults(func=_ca)
    return parser
