"""``metrics.adapter_labels`` / ``metrics.tenant_labels`` and their limits: bounded by default,
and a bad value or a limit the mode does not read fails at load with one ConfigError naming the
key."""

from __future__ import annotations

from typing import Any

import pytest

from loragate.core.config import config_from_mapping
from loragate.core.errors import ConfigError


def _doc(**metrics: Any) -> dict[str, Any]:
    return {"base_model": "m", "replicas": ["http://h:1"], "metrics": metrics}


def test_the_default_keeps_the_first_20_names_of_each() -> None:
    cfg = config_from_mapping({"base_model": "m", "replicas": ["http://h:1"]})
    assert (cfg.metrics.adapter_labels, cfg.metrics.adapter_label_limit) == ("first_n", 20)
    assert (cfg.metrics.tenant_labels, cfg.metrics.tenant_label_limit) == ("first_n", 20)


def test_modes_and_limits_are_read() -> None:
    cfg = config_from_mapping(
        _doc(adapter_labels="all", tenant_labels="first_n", tenant_label_limit=5000)
    )
    assert cfg.metrics.adapter_labels == "all"
    assert (cfg.metrics.tenant_labels, cfg.metrics.tenant_label_limit) == ("first_n", 5000)
    assert config_from_mapping(_doc(adapter_labels="none")).metrics.adapter_labels == "none"


def test_listed_names_are_read() -> None:
    cfg = config_from_mapping(
        _doc(
            adapter_labels="listed",
            adapter_label_names=["org/lora-b", "lora-a"],
            tenant_labels="listed",
            tenant_label_names=["acme"],
        )
    )
    assert (cfg.metrics.adapter_labels, cfg.metrics.adapter_label_names) == (
        "listed", ("org/lora-b", "lora-a"),
    )  # fmt: skip
    assert (cfg.metrics.tenant_labels, cfg.metrics.tenant_label_names) == ("listed", ("acme",))


@pytest.mark.parametrize(
    ("metrics", "key", "says"),
    [
        ({"adapter_labels": "top_n"}, "metrics.adapter_labels", "got 'top_n'"),
        ({"adapter_labels": "frist_n"}, "metrics.adapter_labels", "misspelling of 'first_n'"),
        ({"tenant_labels": 3}, "metrics.tenant_labels", "expected a non-empty string"),
        ({"adapter_label_limit": 0}, "metrics.adapter_label_limit", "must be >= 1"),
        ({"adapter_label_limit": "10"}, "metrics.adapter_label_limit", "expected an integer"),
        ({"tenant_label_limit": 10**6}, "metrics.tenant_label_limit", "must be <= 100000"),
        (
            {"adapter_labels": "all", "adapter_label_limit": 10},
            "metrics.adapter_label_limit",
            "read only with metrics.adapter_labels: first_n (it is 'all' here)",
        ),
        (
            {"tenant_labels": "none", "tenant_label_limit": 10},
            "metrics.tenant_label_limit",
            "read only with metrics.tenant_labels: first_n",
        ),
        ({"adapter_label": "none"}, "metrics.adapter_label", "misspelling of 'adapter_labels'"),
        (
            {"adapter_labels": "listed"},
            "metrics.adapter_label_names",
            "required with metrics.adapter_labels: listed",
        ),
        (
            {"tenant_label_names": ["t"]},
            "metrics.tenant_label_names",
            "read only with metrics.tenant_labels: listed (it is 'first_n' here)",
        ),
        (
            {"adapter_labels": "listed", "adapter_label_names": ["a"], "adapter_label_limit": 2},
            "metrics.adapter_label_limit",
            "read only with metrics.adapter_labels: first_n (it is 'listed' here)",
        ),
        (
            {"adapter_labels": "listed", "adapter_label_names": []},
            "metrics.adapter_label_names",
            "at least one name",
        ),
        (
            {"adapter_labels": "listed", "adapter_label_names": "lora-0"},
            "metrics.adapter_label_names",
            "expected a list",
        ),
        (
            {"tenant_labels": "listed", "tenant_label_names": ["t", ""]},
            "metrics.tenant_label_names[1]",
            "expected a non-empty string",
        ),
        (
            {"adapter_labels": "listed", "adapter_label_names": ["a", "b", "a"]},
            "metrics.adapter_label_names[2]",
            "duplicate name 'a'",
        ),
        (
            {"adapter_labels": "listed", "adapter_label_names": ["__other__"]},
            "metrics.adapter_label_names[0]",
            "'__other__' is reserved",
        ),
        ({"adapter_label_name": ["a"]}, "metrics.adapter_label_name", "adapter_label_names"),
    ],
)
def test_a_bad_value_names_the_key(metrics: dict[str, Any], key: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(_doc(**metrics))
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"adapters": [{"name": "__other__", "path": "/p"}]}, "adapters[0].name"),
        ({"tenants": [{"name": "__other__", "api_keys": ["sk-1"]}]}, "tenants[0].name"),
    ],
)
def test_the_folded_label_value_names_no_adapter_nor_tenant(
    section: dict[str, Any], key: str
) -> None:
    """``__other__`` is the label value of folded names: an adapter or tenant so named would
    add up with them."""
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"base_model": "m", "replicas": ["http://h:1"], **section})
    assert info.value.key == key
    assert "'__other__' is reserved" in str(info.value)
