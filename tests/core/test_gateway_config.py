"""Gateway config: a mapping -> frozen dataclasses; a bad document is one ConfigError naming
the key."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from loragate.core.config import GatewayConfig, config_from_mapping
from loragate.core.errors import ConfigError
from loragate.core.types import ReplicaSettings


def _base() -> dict[str, Any]:
    return {
        "base_model": "tiny-llama",
        "replicas": [
            {"id": "a", "url": "http://127.0.0.1:18101/", "settings": {"max_loras": 2}},
            "http://127.0.0.1:18102",
        ],
        "adapters": [
            {"name": "lora-0", "path": "/loras/lora-0", "rank": 16, "tenants": ["acme"]},
            {"name": "lora-1", "path": "/loras/lora-1"},
        ],
        "tenants": [
            {"name": "acme", "api_keys": ["sk-acme"]},
            {"name": "beta", "api_keys": ["sk-beta-1", "sk-beta-2"]},
        ],
        "routing": {"policy": "least_loaded", "seed": 7},
        "limits": {"max_body_bytes": 1000, "request_timeout_s": 5},
        "poller": {"interval_s": 0.25, "failures_to_unhealthy": 2},
        "server": {"host": "0.0.0.0", "port": 9000},
    }


def test_full_document_builds_frozen_config() -> None:
    cfg = config_from_mapping(_base())
    assert isinstance(cfg, GatewayConfig)
    assert cfg.base_model == "tiny-llama"
    assert [r.replica_id for r in cfg.replicas] == ["a", "r1"]
    assert cfg.replicas[0].url == "http://127.0.0.1:18101"  # trailing slash dropped
    assert cfg.replicas[0].settings == ReplicaSettings(max_loras=2, max_cpu_loras=2)
    assert cfg.replicas[1].settings is None
    assert cfg.adapters[0].rank == 16 and cfg.adapters[0].tenants == frozenset({"acme"})
    assert cfg.adapters[1].rank == 8 and cfg.adapters[1].tenants is None
    assert cfg.tenant_by_key() == {"sk-acme": "acme", "sk-beta-1": "beta", "sk-beta-2": "beta"}
    assert cfg.auth_required
    assert cfg.routing.build_spec() == {"policy": "least_loaded"}
    assert cfg.routing.seed == 7
    assert cfg.limits.max_body_bytes == 1000 and cfg.limits.request_timeout_s == 5.0
    assert cfg.poller.failures_to_unhealthy == 2
    assert cfg.server.port == 9000
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.base_model = "x"  # type: ignore[misc]


def test_minimal_document_uses_defaults() -> None:
    cfg = config_from_mapping({"base_model": "m", "replicas": ["http://h:1"]})
    assert cfg.routing.build_spec() == "round_robin"
    assert not cfg.auth_required and cfg.adapters == () and cfg.tenants == ()
    assert cfg.limits.max_body_bytes > 0


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node: Any = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("base_model", _DELETE, "base_model"),
        ("base_model", 3, "base_model"),
        ("replicas", [], "replicas"),
        ("replicas.0.url", "ftp://x", "replicas[0].url"),
        ("replicas.0.url", "http://h:99999", "replicas[0].url"),
        ("replicas.1", {"id": "a", "url": "http://h:2"}, "replicas[1].id"),
        ("replicas.0.settings", {"max_loras": 0}, "replicas[0].settings.max_loras"),
        ("replicas.0.settings", {"max_lora": 2}, "replicas[0].settings.max_lora"),
        ("adapters.0.name", "tiny-llama", "adapters[0].name"),
        ("adapters.1.name", "lora-0", "adapters[1].name"),
        ("adapters.0.tenants", ["nobody"], "adapters[0].tenants[0]"),
        ("adapters.0.rank", "8", "adapters[0].rank"),
        ("adapters.0.rank", 10**400, "adapters[0].rank"),
        ("adapters.0.rank", 65537, "adapters[0].rank"),
        ("adapters.1.path", _DELETE, "adapters[1].path"),
        ("tenants.1.api_keys", ["sk-acme"], "tenants[1].api_keys[0]"),
        ("tenants.1.name", "acme", "tenants[1].name"),
        ("limits.request_timeout_s", -1, "limits.request_timeout_s"),
        ("limits.max_body_bytes", True, "limits.max_body_bytes"),
        ("limits.timeout", 3, "limits.timeout"),
        ("poller.interval_s", "fast", "poller.interval_s"),
        ("server.port", 70000, "server.port"),
        ("routing", 5, "routing"),
        ("extra", 1, "extra"),
    ],
)
def test_bad_value_names_the_key(path: str, value: Any, key: str) -> None:
    doc = _set(_base(), path, value)
    with pytest.raises(ConfigError) as info:
        config_from_mapping(doc)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


def test_empty_document_is_an_error() -> None:
    with pytest.raises(ConfigError, match="empty"):
        config_from_mapping(None)


def test_replica_settings_default_the_cpu_cache_to_max_loras_as_vllm_does() -> None:
    cfg = config_from_mapping(
        {"base_model": "m", "replicas": [{"url": "http://h:1", "settings": {"max_loras": 16}}]}
    )
    settings = cfg.replicas[0].settings
    assert settings is not None
    assert (settings.max_loras, settings.max_cpu_loras) == (16, 16)


def test_a_cpu_cache_smaller_than_the_gpu_slots_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_mapping(
            {
                "base_model": "m",
                "replicas": [
                    {"url": "http://h:1", "settings": {"max_loras": 8, "max_cpu_loras": 4}}
                ],
            }
        )
    assert err.value.key == "replicas[0].settings.max_cpu_loras"
    assert "must be at least max_loras (8)" in str(err.value)


@pytest.mark.parametrize(
    ("path", "value", "key", "shown"),
    [
        # What the proxy would write into its request head as is: header lines injected.
        ("replicas.0.api_key", "sk-1\r\nX-Injected: 1", "replicas[0].api_key",
         r"'\r' at position 4"),
        # Not Latin-1: UpstreamPool cannot encode it (start-up or a reload failed half-way).
        ("replicas.1", {"url": "http://h:2", "api_key": "ключ"}, "replicas[1].api_key",
         r"'\u043a' at position 0"),
        # Latin-1 but not ASCII: the two replica clients send different bytes.
        ("replicas.0.api_key", "sk-é", "replicas[0].api_key", r"'\xe9' at position 3"),
        ("replicas.0.api_key", "sk-1 ", "replicas[0].api_key", "ends with a space"),
        ("replicas.0.id", "r\n0", "replicas[0].id", r"'\n' at position 1"),
        ("replicas.0.url", "http://127.0.0.1:18101/v1\r\nX: 1", "replicas[0].url",
         r"'\r' at position 25"),
        ("replicas.0.url", "http://h:1/a b", "replicas[0].url", "' ' at position 12"),
        ("replicas.0.url", "http://bücher.example:1", "replicas[0].url", r"'\xfc' at position 8"),
        ("replicas.0.url", "http://h:1/?x=1", "replicas[0].url", "no query or fragment"),
        ("replicas.0.url", "http://user:secret@h:1", "replicas[0].url",
         "give the replica's key as api_key"),
        ("tenants.0.api_keys", ["sk-\tacme"], "tenants[0].api_keys[0]", r"'\t' at position 3"),
        ("admin", {"token": "tök"}, "admin.token", r"'\xf6' at position 1"),
        ("admin", {"token": "t\r\nX: 1"}, "admin.token", r"'\r' at position 1"),
    ],
)  # fmt: skip
def test_strings_that_go_into_http_headers_or_urls_are_refused_naming_the_key(
    path: str, value: Any, key: str, shown: str
) -> None:
    doc = _set(_base(), path, value)
    with pytest.raises(ConfigError) as info:
        config_from_mapping(doc)
    assert info.value.key == key
    message = str(info.value)
    assert message.startswith(f"{key}: ") and "\n" not in message and "\r" not in message
    assert shown in message
    assert "secret" not in message and "acme" not in message  # keys are not echoed


def test_header_safe_strings_are_kept_as_written() -> None:
    doc = _base()
    doc["replicas"][0]["api_key"] = "sk-A.b_c~1+/=="
    doc["admin"] = {"token": "change me"}  # a space inside is sendable
    doc["replicas"][1] = "http://[::1]:8000/prefix%20x/"
    cfg = config_from_mapping(doc)
    assert cfg.replicas[0].api_key == "sk-A.b_c~1+/=="
    assert cfg.admin.token == "change me"
    assert cfg.replicas[1].url == "http://[::1]:8000/prefix%20x"


def test_a_routing_section_that_contains_itself_is_refused_naming_where() -> None:
    """A YAML alias inside its own anchor (``routing: &r {policy: x, sub: *r}``) parses to a
    mapping that contains itself: one ConfigError, not a RecursionError (which a reload let
    through as a 500 and SIGHUP as an 'error')."""
    doc = _base()
    routing: dict[str, Any] = {"policy": "least_loaded"}
    routing["weights"] = routing
    doc["routing"] = routing
    with pytest.raises(ConfigError) as info:
        config_from_mapping(doc)
    assert info.value.key == "routing.weights"
    looped: list[Any] = []
    looped.append(looped)
    doc["routing"] = {"policy": "least_loaded", "weights": looped}
    with pytest.raises(ConfigError) as info:
        config_from_mapping(doc)
    assert info.value.key == "routing.weights[0]"
