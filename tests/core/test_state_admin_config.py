"""The ``state:`` and ``admin:`` sections of the gateway config."""

from __future__ import annotations

from typing import Any

import pytest

from loragate.core.config import AdminConfig, StateConfig, config_from_mapping
from loragate.core.errors import ConfigError


def _doc(**sections: Any) -> dict[str, Any]:
    return {"base_model": "m", "replicas": ["http://h:1"], **sections}


def test_defaults_are_an_embedded_store_and_no_admin_token() -> None:
    cfg = config_from_mapping(_doc())
    assert cfg.state == StateConfig() and cfg.state.backend == "memory"
    assert cfg.admin == AdminConfig() and cfg.admin.token is None


def test_redis_state_and_admin_token() -> None:
    cfg = config_from_mapping(
        _doc(
            state={
                "backend": "redis",
                "redis_url": "redis://127.0.0.1:6379/0",
                "key_prefix": "lg:",
                "op_timeout_s": 0.2,
                "refresh_s": 0.1,
                "lease_ttl_s": 20,
                "lease_renew_s": 5,
            },
            admin={"token": "s3cret"},
        )
    )
    assert cfg.state.backend == "redis"
    assert cfg.state.redis_url == "redis://127.0.0.1:6379/0"
    assert (cfg.state.key_prefix, cfg.state.op_timeout_s, cfg.state.refresh_s) == ("lg:", 0.2, 0.1)
    assert (cfg.state.lease_ttl_s, cfg.state.lease_renew_s) == (20.0, 5.0)
    assert cfg.admin.token == "s3cret"


@pytest.mark.parametrize(
    ("section", "value", "key"),
    [
        ("state", {"backend": "etcd"}, "state.backend"),
        ("state", {"backend": "redis"}, "state.redis_url"),
        ("state", {"backend": "redis", "redis_url": "http://h:6379"}, "state.redis_url"),
        ("state", {"refresh_s": 0}, "state.refresh_s"),
        ("state", {"op_timeout_s": "fast"}, "state.op_timeout_s"),
        ("state", {"lease_ttl_s": 5, "lease_renew_s": 5}, "state.lease_renew_s"),
        ("state", {"redis": "x"}, "state.redis"),
        ("state", "redis", "state"),
        ("admin", {"token": ""}, "admin.token"),
        ("admin", {"token": 5}, "admin.token"),
        ("admin", {"user": "x"}, "admin.user"),
    ],
)
def test_bad_value_names_the_key(section: str, value: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(_doc(**{section: value}))
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


def test_tombstone_ttl_defaults_to_30_s_and_can_be_set() -> None:
    assert config_from_mapping(_doc()).state.tombstone_ttl_s == 30.0
    cfg = config_from_mapping(_doc(state={"tombstone_ttl_s": 120}))
    assert cfg.state.tombstone_ttl_s == 120.0
    # The floor follows the refresh and poll periods: 2 * (0.25 + 0.5) = 1.5 s by default.
    assert config_from_mapping(_doc(state={"tombstone_ttl_s": 1.5})).state.tombstone_ttl_s == 1.5


@pytest.mark.parametrize("value", [0, -5, "30s", None, True, float("inf")])
def test_a_bad_tombstone_ttl_names_the_key(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(_doc(state={"tombstone_ttl_s": value}))
    assert info.value.key == "state.tombstone_ttl_s"


def test_a_tombstone_ttl_a_stale_instance_could_miss_is_refused_saying_why() -> None:
    doc = _doc(state={"refresh_s": 2, "tombstone_ttl_s": 10}, poller={"interval_s": 4})
    with pytest.raises(ConfigError) as info:
        config_from_mapping(doc)
    assert info.value.key == "state.tombstone_ttl_s"
    message = str(info.value)
    assert "must be at least 12 s" in message and "got 10" in message
    assert "state.refresh_s 2" in message and "poller.interval_s 4" in message
    assert "expire unseen" in message
    doc["state"]["tombstone_ttl_s"] = 12
    assert config_from_mapping(doc).state.tombstone_ttl_s == 12.0
