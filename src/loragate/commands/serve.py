"""``loragate serve --config FILE``: run the gateway (aiohttp on uvloop). SIGHUP reloads FILE
(a bad file is logged and the running config stays). SIGINT/SIGTERM stop it gracefully: new
connections are refused, requests in flight get ``server.shutdown_timeout_s`` to finish and
the rest are answered with an error (a second signal cuts them at once); then it exits 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

HELP = "Run the loragate gateway (OpenAI-compatible front door for vLLM replicas)."


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {port}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="gateway YAML config")
    parser.add_argument("--host", default=None, help="bind address (default: server.host)")
    parser.add_argument("--port", type=_port, default=None, help="port (default: server.port)")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (per-request events are never logged at INFO)",
    )


def run(args: argparse.Namespace) -> int:
    import uvloop

    from loragate.core.errors import ConfigError
    from loragate.gateway import load_config, serve_until_signalled
    from loragate.gateway.runner import ListenError

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        # Errors found in the file name it with their line (gw.yaml:3:1: limits: ...); others
        # (a missing file, a bad environment variable) get the file named here.
        where = "" if str(exc).startswith(f"{args.config}:") else f" {args.config}"
        print(f"loragate serve: bad config{where}: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(
                serve_until_signalled(
                    config, host=args.host, port=args.port, config_path=args.config
                )
            )
    except ListenError as exc:
        print(f"loragate serve: {exc}", file=sys.stderr)
        return 1
    return 0
