"""``loragate serve --config FILE``: run the gateway (aiohttp on uvloop). SIGHUP reloads FILE
(a bad file is logged and the running config stays). SIGINT/SIGTERM stop it gracefully: new
connections are refused, requests in flight get ``server.shutdown_timeout_s`` to finish and
the rest are answered with an error (a second signal cuts them at once); then it exits 0.

``--check`` loads and validates FILE as ``serve`` would (the routing section built, adapter
ranks read from their folders, ``LORAGATE_ADMIN_TOKEN`` / ``LORAGATE_METRICS_TOKEN`` /
``LORAGATE_LOG_FORMAT`` checked) and serves nothing: one OK line on stdout with the policy and
the routing section's sha256 as ``loragate_config_info{policy, sha256}`` shows them once served,
exit 0; an error is serve's one line, exit 2. Nothing is contacted (replicas, Redis): for the CI
of a config (e.g. a Kubernetes Secret) before it is rolled out."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loragate.core.config import GatewayConfig

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
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config as serve would (environment variables included) and exit: "
        "one OK line with the policy and the sha256 loragate_config_info shows, exit 0; a bad "
        "config is one line, exit 2. Contacts no replica and no Redis",
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
    if args.check:
        print(_check_line(args.config, config))
        return 0
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


def _check_line(path: str, config: GatewayConfig) -> str:
    """``--check``'s OK line: what the file defines, and the policy and sha256 of its routing
    section as ``loragate_config_info`` shows them."""
    from loragate.gateway.telemetry import routing_sha256
    from loragate.routing import build_policy

    policy = build_policy(config.routing.build_spec(), seed=config.routing.seed)

    def n(count: int, what: str) -> str:
        return f"{count} {what}{'' if count == 1 else 's'}"

    return (
        f"loragate serve: {path}: config OK ({n(len(config.replicas), 'replica')}, "
        f"{n(len(config.adapters), 'adapter')}, {n(len(config.tenants), 'tenant')}; "
        f"state {config.state.backend}; loragate_config_info policy={policy.name} "
        f"sha256={routing_sha256(config.routing)})"
    )
