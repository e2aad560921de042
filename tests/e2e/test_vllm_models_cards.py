"""The gateway's ``GET /v1/models`` cards against a REAL vLLM 0.32 CPU replica's: the same keys
with the same JSON types, card by card and in the permission entries, and the same values where
the gateway takes them from the replica (the base model's ``root`` and ``max_model_len``, an
adapter's ``parent`` and ``root``). Read through the official openai SDK."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from vllm_e2e import BASE

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from vllm_cpu.replica import Replica

pytestmark = pytest.mark.vllm

VOLATILE = ("id", "created")  # a permission's id and every `created` differ between answers


def _shape(value: Any) -> Any:
    """The keys and JSON types of a card (recursively), not its values."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


async def _cards(url: str) -> dict[str, dict[str, Any]]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as sdk:
        return {m.id: m.to_dict() async for m in sdk.models.list()}


async def test_gateway_cards_have_vllms_keys_types_and_values(
    real_vllm: Replica,
    http: aiohttp.ClientSession,
    lora_paths: dict[int, list[str]],
    unique_name: str,
) -> None:
    path = lora_paths[8][0]
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": "real0", "url": real_vllm.base_url}],
        "adapters": [{"name": unique_name, "path": path, "rank": 8}],
        "poller": {"interval_s": 0.5},
    }
    async with running_gateway(config_from_mapping(doc), port=0) as gw:
        # through the gateway, so that vLLM registers the adapter and lists its card too
        async with http.post(
            gw.url + "/v1/completions",
            json={"model": unique_name, "prompt": "hi", "max_tokens": 1},
        ) as resp:
            assert resp.status == 200, await resp.text()
        ours = await _cards(gw.url)
    theirs = await _cards(real_vllm.base_url)
    for name in (BASE, unique_name):
        assert _shape(ours[name]) == _shape(theirs[name]), name
        assert len(ours[name]["permission"]) == len(theirs[name]["permission"]) == 1
        perm_ours, perm_theirs = ours[name]["permission"][0], theirs[name]["permission"][0]
        for key in VOLATILE:
            del perm_ours[key], perm_theirs[key]
        assert perm_ours == perm_theirs
        for key in ("object", "owned_by", "root", "parent", "max_model_len"):
            assert ours[name][key] == theirs[name][key], (name, key)
    assert theirs[BASE]["max_model_len"] == 512 and theirs[unique_name]["root"] == path
