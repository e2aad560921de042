"""Adapter names in a config file: what vLLM 0.32 takes as ``lora_name`` (any non-empty string,
``org/name`` too), but for what ``DELETE /admin/adapters/<name>`` could not address."""

from __future__ import annotations

import pytest

from loragate.core.config import adapter_name_problem, config_from_mapping
from loragate.core.errors import ConfigError


def _load(name: str) -> str:
    doc = {
        "base_model": "m",
        "replicas": ["http://h:1"],
        "adapters": [{"name": name, "path": "/p"}],
    }
    return config_from_mapping(doc).adapters[0].name


@pytest.mark.parametrize("name", ["org/lora", "a b", "lora-ü", "a..b", ".hidden", "a/", "a%2Fb"])
def test_names_vllm_takes_and_the_admin_api_can_address_load(name: str) -> None:
    assert _load(name) == name and adapter_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "says"),
    [
        (".", "'.' and '..'"),
        ("..", "'.' and '..'"),
        ("org/../lora", "'.' and '..'"),
        ("org/./lora", "'.' and '..'"),
        ("lora/..", "'.' and '..'"),
        ("lora\nINFO forged", "character '\\n' at position 4"),
        ("lora\t1", "character '\\t' at position 4"),
        ("lora\x7f", "character '\\x7f' at position 4"),
        ("lora\x85", "character '\\x85' at position 4"),
    ],
)
def test_names_the_admin_api_could_not_address_are_refused(name: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(name)
    assert info.value.key == "adapters[0].name"
    assert says in str(info.value)
