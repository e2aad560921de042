"""The example gateway configs load (every key validated) and say what they are about."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from loragate.core.config import config_from_mapping
from loragate.core.errors import ConfigError
from loragate.gateway import load_config
from loragate.gateway.runner import running_gateway
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica

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
    # Its comment starts simulated replicas from the repository root: the adapters are there.
    for adapter in config.adapters:
        meta = json.loads((EXAMPLES.parent / adapter.path / "adapter_config.json").read_text())
        assert meta["r"] == adapter.rank


async def test_local_example_serves_its_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/local: the README's run-it-yourself set-up works as written (ports aside)."""
    repo = EXAMPLES.parent
    monkeypatch.chdir(repo)  # adapter paths are relative to the replicas' working directory
    data = yaml.safe_load((EXAMPLES / "local" / "gateway.yaml").read_text(encoding="utf-8"))
    replica_cfg = ReplicaConfig(
        served_model_name=data["base_model"], enable_lora=True, max_loras=2, max_cpu_loras=4
    )
    async with run_replica(replica_cfg, port=0) as r0, run_replica(replica_cfg, port=0) as r1:
        for entry, replica in zip(data["replicas"], (r0, r1), strict=True):
            entry["url"] = replica.url
        config = config_from_mapping(data)
        for adapter in config.adapters:
            meta = json.loads((repo / adapter.path / "adapter_config.json").read_text("utf-8"))
            assert meta["r"] == adapter.rank
        async with running_gateway(config, port=0) as gw:
            client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-acme-123")
            try:
                out = await client.completions.create(model="lora-0", prompt="hi", max_tokens=3)
                assert out.model == "lora-0" and out.usage is not None
                with pytest.raises(openai.NotFoundError):  # globex's adapter is invisible
                    await client.completions.create(model="lora-2", prompt="hi", max_tokens=3)
            finally:
                await client.close()


def _accepted_keys(section: str, document: dict[str, Any]) -> set[str]:
    """The keys the schema accepts at ``section``, read from its own unknown-key error."""
    with pytest.raises(ConfigError) as exc:
        config_from_mapping(document)
    assert exc.value.key == f"{section}.zzz".lstrip("."), exc.value
    return set(str(exc.value).split("allowed: ", 1)[1].rstrip(")").split(", "))


def test_the_full_example_documents_every_key_of_the_schema() -> None:
    """README: "examples/gateway.yaml documents all of them". Every key the validator accepts
    appears in it (set, or commented out with its default), so a new key cannot go
    undocumented."""
    base: dict[str, Any] = {"base_model": "m", "replicas": [{"url": "http://127.0.0.1:1"}]}
    bad = {"zzz": 1}  # close to no key: the error lists them all (no misspelling hint)
    sections: dict[str, dict[str, Any]] = {
        "": {**base, **bad},
        "replicas[0]": {**base, "replicas": [{"url": "http://127.0.0.1:1", **bad}]},
        "replicas[0].settings": {
            **base,
            "replicas": [{"url": "http://127.0.0.1:1", "settings": bad}],
        },
        "adapters[0]": {**base, "adapters": [{"name": "a", "path": "/a", **bad}]},
        "tenants[0]": {**base, "tenants": [{"name": "t", "api_keys": ["k"], **bad}]},
        **{
            name: {**base, name: bad}
            for name in ("limits", "poller", "server", "state", "admin", "metrics")
        },
    }
    text = (EXAMPLES / "gateway.yaml").read_text(encoding="utf-8")
    missing = []
    for section, document in sections.items():
        keys = _accepted_keys(section, document)
        assert keys, section
        missing += [
            f"{section}.{key}".lstrip(".")
            for key in sorted(keys)
            if not re.search(rf"(^|[\s{{,#-]){re.escape(key)}:", text, re.MULTILINE)
        ]
    if not re.search(r"^#?\s*seed:", text, re.MULTILINE):
        missing.append("routing.seed")
    assert not missing, f"examples/gateway.yaml does not mention: {', '.join(missing)}"
