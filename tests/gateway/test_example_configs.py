"""The example gateway configs load (every key validated) and say what they are about."""

from __future__ import annotations

from pathlib import Path

from loragate.gateway import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_single_instance_example_uses_the_embedded_store() -> None:
    config = load_config(EXAMPLES / "gateway.yaml")
    assert config.state.backend == "memory"
    assert config.admin.token


def test_two_instance_example_shares_state_through_redis() -> None:
    config = load_config(EXAMPLES / "gateway-redis.yaml")
    assert config.state.backend == "redis"
    assert config.state.redis_url == "redis://127.0.0.1:6379/0"
    assert config.state.refresh_s < config.state.lease_renew_s < config.state.lease_ttl_s
    assert config.routing.build_spec() == "loragate"
    assert {r.replica_id for r in config.replicas} == {"r0", "r1"}
