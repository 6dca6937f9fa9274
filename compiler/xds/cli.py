"""The `meshc serve` subcommand: flags → `Options` → a running server.

Owns argument checking: every user mistake (bad HOST:PORT, missing
directory or certificate) is one `error:` line and exit status 2, never a
traceback. `add_parser` is what `compiler/cli.py` registers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import re
import signal
import sys
from pathlib import Path

from compiler.errors import UsageError  # a flag value that cannot work: `error: ...`, exit status 2

__all__ = ["add_parser", "main", "run"]


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    """Add `serve` to the `meshc` subcommands."""
    parser = subparsers.add_parser(
        "serve", help="serve rendered Envoy snapshots to proxies over xDS (gRPC and REST)",
        description="Serve rendered/<env>/envoy/*.json to Envoy proxies: gRPC ADS (SotW and "
                    "Delta) and per-type services, REST-JSON polling, /healthz /readyz "
                    "/metrics /debug/proxies. A proxy's node.cluster names its environment.")
    parser.add_argument("--rendered", type=Path, default=Path("rendered"), metavar="DIR",
                        help="the rendered directory (default: rendered)")
    parser.add_argument("--grpc", type=_address, default=("127.0.0.1", 18000), metavar="HOST:PORT",
                        help="gRPC xDS address (default: 127.0.0.1:18000)")
    parser.add_argument("--http", type=_address, default=("127.0.0.1", 18001), metavar="HOST:PORT",
                        help="HTTP address: REST xDS, health, metrics, debug (default: 127.0.0.1:18001)")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE",
                        help="serve gRPC and HTTP over TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="the certificate's key (PEM)")
    parser.add_argument("--secrets", type=Path, metavar="DIR",
                        help="serve the TLS secrets in DIR over SDS: DIR/default/ as `default` and `ROOTCA`, "
                             "DIR/NAME/ as `kubernetes://NAME` (tls.crt, tls.key, ca.crt); mode 0700, "
                             "polled every --poll-interval")
    parser.add_argument("--client-ca", type=Path, metavar="FILE",
                        help="require client certificates signed by this CA (mutual TLS)")
    parser.add_argument("--rest-xds-cluster", default="xds_cluster", metavar="NAME",
                        help="the proxy's cluster for this server, named in the REST config "
                             "sources that replace ADS ones in REST responses (default: xds_cluster)")
    parser.add_argument("--rest-refresh-delay", default="1s", metavar="DURATION",
                        help="refresh_delay in those REST config sources (default: 1s)")
    parser.add_argument("--debounce", type=_positive, default=0.05, metavar="SECONDS",
                        help="quiet time after a file change before reloading (default: 0.05)")
    parser.add_argument("--watch", choices=("auto", "inotify", "poll"), default="auto",
                        help="how to notice file changes (default: auto = inotify, else poll)")
    parser.add_argument("--poll-interval", type=_positive, default=1.0, metavar="SECONDS",
                        help="polling period when polling (default: 1)")
    parser.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024, metavar="N",
                        help="largest gRPC message or HTTP body accepted (default: 4 MiB)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))
    parser.set_defaults(func=run)


def _options(args: argparse.Namespace):
    from compiler.xds.server import Options

    if not args.rendered.is_dir():
        raise UsageError(f"--rendered {args.rendered}: not a directory")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        raise UsageError("--client-ca needs --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                       ("--client-ca", args.client_ca)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if args.secrets is not None:
        from compiler.xds.secrets import check_dir

        problem = check_dir(args.secrets)
        if problem:
            raise UsageError(f"--secrets {problem}")
    if not (0 < args.max_message_bytes <= 256 * 1024 * 1024):
        raise UsageError("--max-message-bytes must be between 1 and 268435456")
    if args.watch == "poll" and args.poll_interval <= 0:
        raise UsageError("--poll-interval must be > 0")
    if not re.fullmatch(r"\d+(\.\d{1,9})?s", args.rest_refresh_delay):
        raise UsageError("--rest-refresh-delay is a duration in seconds, like 1s or 0.5s")
    return Options(rendered=args.rendered, grpc_host=args.grpc[0], grpc_port=args.grpc[1],
                   http_host=args.http[0], http_port=args.http[1], tls_cert=args.tls_cert,
                   tls_key=args.tls_key, client_ca=args.client_ca,
                   rest_xds_cluster=args.rest_xds_cluster,
                   rest_refresh_delay=args.rest_refresh_delay, debounce=args.debounce,
                   watch=args.watch, poll_interval=args.poll_interval or 1.0,
                   max_message_bytes=args.max_message_bytes, secrets=args.secrets)


async def _serve(options) -> None:
    from compiler.xds.server import Server

    server = Server(options)
    await server.start()
    # What the first load built (every environment's resources: millions of objects) lives
    # as long as it is served, and most of it longer (a reload reuses what did not change).
    # Out of the collector's sight it is not traversed by every full collection: one came
    # with each push at 1,000 services, 0.2-0.25 s of the event loop (0.1 s frozen).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("meshc.xds").info("stopping")
    await server.stop()


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM. 0 on a clean stop, 2 on a usage error."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="meshc serve: %(levelname)s: %(message)s")
    try:
        options = _options(args)
        asyncio.run(_serve(options))
    except UsageError as exc:
        print(f"meshc serve: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:          # a port in use, a certificate unreadable
        print(f"meshc serve: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:     # grpc: "Failed to bind to address"
        print(f"meshc serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:       # Ctrl-C while still loading
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m compiler.xds [flags]`: the serve subcommand alone."""
    parser = argparse.ArgumentParser(prog="meshc")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
