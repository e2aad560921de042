"""docker-compose.yml (no Docker engine here): every loragate command in it must parse with the
real CLI parser, and the embedded gateway config must load and match the replica services."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from loragate.cli import build_parser
from loragate.gateway import parse_config_text

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _loragate_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if 'ENTRYPOINT ["loragate"]' in svc.get("build", {}).get("dockerfile_inline", "")
    }


def test_services_present(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["redis"]["image"].startswith("redis:")
    commands = {n: s["command"][0] for n, s in _loragate_services(compose).items()}
    assert commands == {"replica-a": "replica", "replica-b": "replica", "gateway": "serve"}
    # The GPU profile with real vLLM images is there, commented out.
    assert "#   image: vllm/vllm-openai" in COMPOSE.read_text(encoding="utf-8")


def test_every_command_is_a_valid_loragate_invocation(compose: dict[str, Any]) -> None:
    parser = build_parser()
    services = _loragate_services(compose)
    assert services
    for name, svc in services.items():
        command = svc["command"]
        assert all(isinstance(arg, str) for arg in command), name
        args = parser.parse_args(command)  # SystemExit (a test failure) if invalid
        assert args.command == command[0], name


def test_the_parser_rejects_a_bad_command() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--no-such-flag"])


def test_gateway_config_matches_the_replicas(compose: dict[str, Any]) -> None:
    parser = build_parser()
    services = _loragate_services(compose)
    config = parse_config_text(compose["configs"]["gateway"]["content"], source="compose")
    gateway_args = parser.parse_args(services["gateway"]["command"])
    mounted = {c["source"]: c["target"] for c in services["gateway"]["configs"]}
    assert mounted["gateway"] == gateway_args.config
    replica_urls = {r.url for r in config.replicas}
    adapter_files: dict[str, str] = {}
    for name in ("replica-a", "replica-b"):
        args = parser.parse_args(services[name]["command"])
        assert f"http://{name}:{args.port}" in replica_urls
        assert args.served_model_name[0] == config.base_model
        assert args.enable_lora
        for cfg in services[name]["configs"]:
            adapter_files[cfg["target"]] = cfg["source"]
    for adapter in config.adapters:  # each adapter folder exists in the replicas
        source = adapter_files[f"{adapter.path}/adapter_config.json"]
        peft = json.loads(compose["configs"][source]["content"])
        assert peft["peft_type"] == "LORA" and peft["r"] == adapter.rank


def test_gateway_shares_state_through_the_redis_service(compose: dict[str, Any]) -> None:
    config = parse_config_text(compose["configs"]["gateway"]["content"], source="compose")
    assert config.state.backend == "redis"
    assert config.state.redis_url is not None and "//redis:6379" in config.state.redis_url
    gateway = compose["services"]["gateway"]
    assert "redis" in gateway["depends_on"]
    assert gateway["environment"]["LORAGATE_ADMIN_TOKEN"]
