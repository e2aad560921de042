"""docker-compose.yml (no Docker engine here): every loragate command in it must parse with the
real CLI parser, the embedded gateway configs (the commented GPU profile's too) must load and
match the replica services and their LoRA flags, and ``docker compose down`` must leave the
gateway its drain."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from loragate.cli import build_parser
from loragate.gateway import create_app, parse_config_text
from loragate.gateway.runner import CUT_GRACE_S, HANDLER_GRACE_S

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


def _seconds(duration: str) -> float:
    """A compose duration (``35s``, ``1m30s``, ``1h``) in seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert match and duration, duration
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_docker_compose_down_leaves_the_gateway_its_drain(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    server = parse_config_text(compose["configs"]["gateway"]["content"], source="compose").server
    needed = server.shutdown_delay_s + server.shutdown_timeout_s + CUT_GRACE_S + 2 * HANDLER_GRACE_S
    assert _seconds(gateway["stop_grace_period"]) >= needed + 1  # compose's default: 10 s


def test_the_gateway_healthcheck_is_its_readiness_probe(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    args = build_parser().parse_args(gateway["command"])
    test = " ".join(gateway["healthcheck"]["test"])
    assert f"http://127.0.0.1:{args.port}/readyz" in test
    config = parse_config_text(compose["configs"]["gateway"]["content"], source="compose")
    routes = create_app(config).router.routes()  # not started: its routes only
    assert any(r.method == "GET" and r.resource.canonical == "/readyz" for r in routes)


def test_the_replicas_settings_are_their_lora_flags(compose: dict[str, Any]) -> None:
    parser = build_parser()
    config = parse_config_text(compose["configs"]["gateway"]["content"], source="compose")
    for replica in config.replicas:
        args = parser.parse_args(compose["services"][replica.replica_id]["command"])
        assert replica.settings is not None, replica.replica_id
        flags = (args.max_loras, args.max_cpu_loras, args.max_lora_rank)
        settings = replica.settings
        assert flags == (settings.max_loras, settings.max_cpu_loras, settings.max_lora_rank)


def _commented_out(section: str) -> dict[str, Any]:
    """The commented-out YAML entries (``  # name:`` and the ``  #   ...`` lines below it) of
    the top-level ``section``, uncommented and parsed."""
    lines: list[str] = []
    current = None
    for line in COMPOSE.read_text(encoding="utf-8").splitlines():
        if re.match(r"[a-z][\w-]*:", line):
            current = line.split(":")[0]
        elif current == section and (
            line.startswith("  #   ") or re.fullmatch(r"  # [a-z][\w-]*:\s*", line)
        ):
            lines.append("  " + line[4:])
    data = yaml.safe_load("\n".join(lines))
    assert isinstance(data, dict), section
    return data


def _vllm_flags(command: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, arg in enumerate(command):
        if arg.startswith("--"):
            following = command[i + 1] if i + 1 < len(command) else None
            out[arg] = None if following is None or following.startswith("--") else following
    return out


def test_the_gpu_profile_matches_its_gateway_config() -> None:
    services = _commented_out("services")
    content = _commented_out("configs")["gateway-gpu"]["content"]
    config = parse_config_text(content, source="compose gateway-gpu")
    assert {r.replica_id for r in config.replicas} == set(services) == {"vllm-a", "vllm-b"}
    for replica in config.replicas:
        vllm = services[replica.replica_id]
        assert vllm["profiles"] == ["gpu"] and vllm["image"].startswith("vllm/vllm-openai:")
        assert replica.url == f"http://{replica.replica_id}:8000"  # vLLM's default port
        flags = _vllm_flags(vllm["command"])
        assert "--enable-lora" in flags and flags["--served-model-name"] == config.base_model
        settings = replica.settings
        assert settings is not None, replica.replica_id
        assert int(flags["--max-loras"] or 0) == settings.max_loras
        assert int(flags["--max-cpu-loras"] or 0) == settings.max_cpu_loras
        assert int(flags["--max-lora-rank"] or 0) == settings.max_lora_rank
        assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert vllm.get("ipc") == "host" or "shm_size" in vllm  # vLLM's Docker docs ask it
        targets = [v.split(":")[1] for v in vllm["volumes"]]
        for adapter in config.adapters:
            assert any(adapter.path.startswith(t + "/") for t in targets), adapter.path
