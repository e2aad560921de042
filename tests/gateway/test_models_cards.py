"""``GET /v1/models`` cards in vLLM 0.32's shape (``owned_by: vllm``, ``root``, ``parent``,
``max_model_len``, ``permission``), with the base model's ``root``/``max_model_len`` as the
replicas report them, read through the openai SDK from a gateway in front of simulated vLLM
replicas (``loragate.twin``, real aiohttp servers on loopback)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_harness import openai_client

from loragate.backends.client import ModelCard, parse_models
from loragate.core.config import config_from_mapping
from loragate.core.types import AdapterSpec
from loragate.gateway import running_gateway
from loragate.gateway.catalog import Catalog
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica

BASE = "tiny-llama"
MODEL_PATH = "/srv/models/tiny-llama"
PERMISSION_KEYS = {
    "id",
    "object",
    "created",
    "allow_create_engine",
    "allow_sampling",
    "allow_logprobs",
    "allow_search_indices",
    "allow_view",
    "allow_fine_tuning",
    "organization",
    "group",
    "is_blocking",
}
CARD_KEYS = {
    "id",
    "object",
    "created",
    "owned_by",
    "root",
    "parent",
    "max_model_len",
    "permission",
}


class Twin:
    def __init__(self, replica: RunningReplica, stop: contextlib.AsyncExitStack) -> None:
        self.url = replica.url
        self.stop = stop


@pytest.fixture
async def two_twins() -> AsyncIterator[list[Twin]]:
    """Two simulated replicas of one model whose max_model_len differ (2048, 1024);
    ``twin.stop.aclose()`` stops one."""
    async with contextlib.AsyncExitStack() as stack:
        reps = []
        for max_len in (2048, 1024):
            own = contextlib.AsyncExitStack()
            stack.push_async_callback(own.aclose)
            cfg = ReplicaConfig(
                served_model_name=BASE,
                model=MODEL_PATH,
                enable_lora=True,
                max_loras=2,
                max_cpu_loras=4,
                max_model_len=max_len,
                time_scale=20.0,
            )
            reps.append(Twin(await own.enter_async_context(run_replica(cfg, port=0)), own))
        yield reps


def _config(urls: list[str], tmp: Path) -> Any:
    return config_from_mapping(
        {
            "base_model": BASE,
            "replicas": [{"id": f"r{i}", "url": u} for i, u in enumerate(urls)],
            "adapters": [
                {
                    "name": "acme-lora",
                    "path": str(tmp / "acme" / "lora"),
                    "rank": 8,
                    "tenants": ["acme"],
                },
                {
                    "name": "beta-lora",
                    "path": str(tmp / "beta" / "lora"),
                    "rank": 8,
                    "tenants": ["beta"],
                },
                {"name": "shared", "path": str(tmp / "shared"), "rank": 8},
            ],
            "tenants": [
                {"name": "acme", "api_keys": ["sk-acme"]},
                {"name": "beta", "api_keys": ["sk-beta"]},
            ],
            "poller": {"interval_s": 3600},  # polled once at start; tests poll explicitly
        }
    )


async def _sdk_cards(url: str, key: str) -> list[dict[str, Any]]:
    async with openai_client(url, key) as client:
        return [m.to_dict() async for m in client.models.list()]


async def test_cards_have_vllms_fields_and_the_replicas_values(
    two_twins: list[Twin], tmp_path: Path
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(two_twins[0].url + "/v1/models") as resp,
    ):
        replica_base = (await resp.json())["data"][0]
    async with running_gateway(_config([r.url for r in two_twins], tmp_path), port=0) as gw:
        cards = await _sdk_cards(gw.url, "sk-acme")
    assert [c["id"] for c in cards] == [BASE, "acme-lora", "shared"]
    base, acme, shared = cards
    for card in cards:
        assert set(card) == CARD_KEYS == set(replica_base)
        assert card["object"] == "model" and card["owned_by"] == "vllm"
        assert isinstance(card["created"], int)
        [perm] = card["permission"]
        assert set(perm) == PERMISSION_KEYS == set(replica_base["permission"][0])
        assert perm["object"] == "model_permission" and perm["id"].startswith("modelperm-")
        assert {k: v for k, v in perm.items() if k not in ("id", "created")} == {
            k: v for k, v in replica_base["permission"][0].items() if k not in ("id", "created")
        }
    # The base model: the replicas' path, and the smaller max_model_len of the two (a request
    # may be sent to either).
    assert base["root"] == MODEL_PATH == replica_base["root"]
    assert base["parent"] is None and base["max_model_len"] == 1024
    # Adapters: parent = the base model, root = the configured path, no max_model_len.
    assert acme["parent"] == BASE and acme["root"] == str(tmp_path / "acme" / "lora")
    assert shared["parent"] == BASE and shared["root"] == str(tmp_path / "shared")
    assert acme["max_model_len"] is None and shared["max_model_len"] is None


async def test_a_tenant_sees_neither_the_card_nor_the_path_of_anothers_adapter(
    two_twins: list[Twin], tmp_path: Path
) -> None:
    async with running_gateway(_config([r.url for r in two_twins], tmp_path), port=0) as gw:
        beta = await _sdk_cards(gw.url, "sk-beta")
        async with (
            aiohttp.ClientSession() as http,
            http.get(gw.url + "/v1/models", headers={"Authorization": "Bearer sk-beta"}) as resp,
        ):
            raw = await resp.text()
    assert [c["id"] for c in beta] == [BASE, "beta-lora", "shared"]
    assert "acme" not in raw  # neither its name nor its path
    assert json.loads(raw)["data"] == beta


async def test_max_model_len_follows_the_healthy_replicas(
    two_twins: list[Twin], tmp_path: Path
) -> None:
    small = two_twins[1]
    cfg = _config([r.url for r in two_twins], tmp_path)
    async with running_gateway(cfg, port=0) as gw:
        assert (await _sdk_cards(gw.url, "sk-acme"))[0]["max_model_len"] == 1024
        await small.stop.aclose()
        pool = gw.gateway.pool
        for _ in range(cfg.poller.failures_to_unhealthy):
            await pool.poll_once()
        assert not pool.is_healthy("r1") and pool.is_healthy("r0")
        assert (await _sdk_cards(gw.url, "sk-acme"))[0]["max_model_len"] == 2048


async def test_before_any_replica_answers_the_base_card_has_no_max_model_len(
    tmp_path: Path,
) -> None:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))  # a port nobody listens on
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with running_gateway(_config([dead], tmp_path), port=0) as gw:
            [base, *_] = await _sdk_cards(gw.url, "sk-acme")
    assert base["root"] == BASE and base["max_model_len"] is None
    assert set(base) == CARD_KEYS


def test_the_cached_list_is_rebuilt_when_the_replicas_report_another_base() -> None:
    catalog = Catalog(
        base_model=BASE, adapters=[AdapterSpec(name="a", path="/loras/a")], api_keys=None
    )
    first = json.loads(
        catalog.models_json(None, ModelCard(id=BASE, parent=None, root="/m", max_model_len=512))
    )
    again = json.loads(
        catalog.models_json(None, ModelCard(id=BASE, parent=None, root="/m", max_model_len=512))
    )
    other = json.loads(
        catalog.models_json(None, ModelCard(id=BASE, parent=None, root="/m2", max_model_len=4096))
    )
    assert first == again
    assert (first["data"][0]["root"], first["data"][0]["max_model_len"]) == ("/m", 512)
    assert (other["data"][0]["root"], other["data"][0]["max_model_len"]) == ("/m2", 4096)
    assert other["data"][1]["root"] == "/loras/a"


@pytest.mark.parametrize(
    ("value", "parsed"), [(512, 512), (None, None), (True, None), ("512", None), (512.0, None)]
)
def test_the_poller_reads_max_model_len_only_as_an_integer(value: object, parsed: object) -> None:
    models = parse_models(
        {
            "object": "list",
            "data": [{"id": BASE, "parent": None, "root": "/m", "max_model_len": value}],
        }
    )
    assert models.cards[0].max_model_len == parsed
