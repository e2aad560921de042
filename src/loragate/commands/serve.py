"""``loragate serve --config FILE``: run the gateway (aiohttp on uvloop). SIGHUP reloads FILE
(a bad file is logged and the running config stays). SIGINT/SIGTERM stop it gracefully: new
connections are refused, requests in flight get ``server.shutdown_timeout_s`` to finish and
the rest are answered with an error (a second signal cuts them at once); then it exits 0."""

from __future__ import annotations

import argparse
import asyncio
import os
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
    parser.add_argument(
        "--log-format",
        default=None,
        choices=("text", "json"),
        help="log lines as text (default) or one JSON object per line, with request_id as a "
        "field in the lines about a request (default: $LORAGATE_LOG_FORMAT, else text)",
    )


def run(args: argparse.Namespace) -> int:
    import uvloop

    from loragate.core.errors import ConfigError
    from loragate.core.signal_handlers import signal_handlers_kept
    from loragate.gateway import load_config, serve_until_signalled
    from loragate.gateway.log_format import ENV, FORMATS, configure_logging
    from loragate.gateway.runner import ListenError

    log_format = args.log_format or os.environ.get(ENV) or "text"
    if log_format not in FORMATS:
        print(
            f"loragate serve: {ENV}={log_format!r}: expected one of {', '.join(FORMATS)}",
            file=sys.stderr,
        )
        return 2
    configure_logging(args.log_level, log_format)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        # Errors found in the file name it with their line (gw.yaml:3:1: limits: ...); others
        # (a missing file, a bad environment variable) get the file named here.
        where = "" if str(exc).startswith(f"{args.config}:") else f" {args.config}"
        print(f"loragate serve: bad config{where}: {exc}", file=sys.stderr)
        return 2
    try:
        # uvloop leaves its own handlers behind after the loop closed (core.signal_handlers).
        with signal_handlers_kept(), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(
                serve_until_signalled(
                    config, host=args.host, port=args.port, config_path=args.config
                )
            )
    except ListenError as exc:
        print(f"loragate serve: {exc}", file=sys.stderr)
        return 1
    return 0
