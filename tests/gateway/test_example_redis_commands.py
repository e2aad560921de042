"""examples/gateway-redis.yaml: the commands in its header comment start replicas that match the
config below them, so an operator who copies them gets the cache sizes the gateway models."""

from __future__ import annotations

import shlex
from pathlib import Path
from urllib.parse import urlsplit

from loragate.cli import build_parser
from loragate.commands.replica import config_from_args
from loragate.gateway import load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gateway-redis.yaml"


def _commented_commands(text: str) -> list[list[str]]:
    """The ``loragate …`` command lines of the leading comment, continuations joined."""
    commands: list[list[str]] = []
    pending = ""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if pending:
            body = pending + " " + body
            pending = ""
        if body.endswith("\\"):
            pending = body[:-1].strip()
            continue
        if body.startswith("loragate "):
            argv = shlex.split(body, comments=True)
            commands.append([a for a in argv[1:] if a != "&"])
    return commands


def test_the_commented_replicas_match_the_config() -> None:
    config = load_config(EXAMPLE)
    by_port = {urlsplit(r.url).port: r for r in config.replicas}
    parser = build_parser()
    commands = _commented_commands(EXAMPLE.read_text(encoding="utf-8"))
    replicas = [parser.parse_args(c) for c in commands if c[0] == "replica"]
    assert {a.port for a in replicas} == set(by_port)
    for args in replicas:
        started = config_from_args(args)
        replica = by_port[args.port]
        assert started.served_model_name == config.base_model
        assert started.enable_lora
        if replica.settings is not None:
            assert replica.settings.max_loras == started.max_loras, replica.replica_id
            assert replica.settings.max_cpu_loras == started.effective_max_cpu_loras
            assert replica.settings.max_lora_rank == started.max_lora_rank
        else:  # the gateway assumes vLLM's default CPU cache: as many entries as GPU slots
            assert started.effective_max_cpu_loras == started.max_loras, replica.replica_id


def test_the_commented_gateways_use_this_file() -> None:
    parser = build_parser()
    serve = [
        parser.parse_args(c)
        for c in _commented_commands(EXAMPLE.read_text(encoding="utf-8"))
        if c[0] == "serve"
    ]
    assert len(serve) >= 2 and len({a.port for a in serve}) == len(serve)
    assert all(Path(a.config) == Path("examples/gateway-redis.yaml") for a in serve)
