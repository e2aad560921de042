"""An adapter whose rank is above a replica's ``max_lora_rank`` (said in its config's
``settings.max_lora_rank``) costs no load attempt there: routing leaves that replica out in
every policy; when every replica's is below the rank, the request is a 400 before routing
naming the adapter, its rank and each replica's max_lora_rank, and ``POST /admin/adapters``
refuses to register it. A replica whose max_lora_rank is not said (vLLM's default assumed)
may take any rank, as before. Over loopback: simulated vLLM 0.32 replicas (``loragate.twin``,
which refuse a rank above their ``--max-lora-rank`` as vLLM 0.32 does: its 500 "Call to
add_lora method failed: Worker failed with error 'LoRA rank 16 is greater than max_lora_rank
8.' ..."), the gateway, the openai SDK."""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import openai_client
from metric_counts import metrics_text

from loragate.core.config import GatewayConfig, config_from_mapping
from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica

BASE = "tiny-llama"
TOKEN = "admin-rank"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def _replicas(*ranks: int) -> AsyncIterator[list[str]]:
    """Simulated replicas started with ``--max-lora-rank`` each of ``ranks``: their URLs."""
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for i, rank in enumerate(ranks):
            cfg = ReplicaConfig(
                served_model_name=BASE, enable_lora=True, max_loras=2, max_lora_rank=rank,
                seed=i, time_scale=50.0,
            )  # fmt: skip
            urls.append((await stack.enter_async_context(run_replica(cfg, port=0))).url)
        yield urls


def _dead_url() -> str:
    """A loopback URL nothing listens on (a replica that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _config(
    tmp: Path, replicas: list[tuple[str, int | None]], policy: Any = "round_robin"
) -> GatewayConfig:
    """Replicas r0, r1, ... at the given URLs, each with ``settings.max_lora_rank`` (None: not
    said); adapters 'small' (rank 8), 'big' and 'big-0'...'big-5' (rank 16), from folders with
    their adapter_config.json."""
    for name, rank in (("small", 8), ("big", 16)):
        write_adapter_folder(str(tmp / name), rank=rank)
    bigs = [{"name": f"big-{i}", "path": str(tmp / "big"), "rank": 16} for i in range(6)]
    return config_from_mapping(
        {
            "base_model": BASE,
            "replicas": [
                {"id": f"r{i}", "url": url}
                | ({} if rank is None else {"settings": {"max_lora_rank": rank}})
                for i, (url, rank) in enumerate(replicas)
            ],
            "adapters": [
                {"name": "small", "path": str(tmp / "small"), "rank": 8},
                {"name": "big", "path": str(tmp / "big"), "rank": 16},
                *bigs,
            ],
            "routing": policy,
            "admin": {"token": TOKEN},
            "poller": {"interval_s": 3600},
        }
    )


async def _get(url: str, path: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url + path, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json(content_type=None)


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of ``name`` with exactly these labels (0 when absent)."""
    for found, value in re.findall(re.escape(name) + r"\{([^}]*)\} (\S+)", text):
        if dict(re.findall(r'(\w+)="([^"]*)"', found)) == labels:
            return float(value)
    return 0.0


async def _registered_on(url: str) -> set[str]:
    """The adapters the replica at ``url`` lists in its /v1/models."""
    data = (await _get(url, "/v1/models"))["data"]
    return {m["id"] for m in data if m["parent"] is not None}


async def test_above_every_known_max_lora_rank_is_a_400_naming_the_numbers(
    tmp_path: Path,
) -> None:
    async with _replicas(8, 8) as urls:
        # Before: each request cost a load on a replica (vLLM's 400), the refusal was
        # remembered, and the client got a 502 carrying vLLM's text.
        cfg = _config(tmp_path, [(urls[0], 8), (urls[1], 8)])
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
            for stream in (False, True, False):
                with pytest.raises(openai.BadRequestError) as info:
                    await client.completions.create(
                        model="big", prompt="p", max_tokens=2, stream=stream
                    )
                body = info.value.body
                assert isinstance(body, dict)
                assert body["param"] == "model" and body["type"] == "invalid_request_error"
                message = body["message"]
                assert "'big'" in message and "LoRA rank 16" in message, message
                assert "max_lora_rank of every replica (r0: 8, r1: 8" in message, message
                assert "x-loragate-replica" not in info.value.response.headers
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(
                    model="big", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
            # No replica was asked to load it.
            assert [await _registered_on(u) for u in urls] == [set(), set()]
            text = await metrics_text(gw.url)
            assert "loragate_adapter_load_refusals_total{" not in text
            # Counted as the gateway's other refusals before routing: under the adapter named.
            requests = "loragate_requests_total"
            assert _sample(text, requests, adapter="big", replica="", status="400") == 4
            # The gateway keeps serving what the replicas can take.
            done = await client.completions.create(model="small", prompt="p", max_tokens=2)
            assert done.model == "small"
            base = await client.completions.create(model=BASE, prompt="p", max_tokens=2)
            assert base.model == BASE


@pytest.mark.parametrize(
    "policy",
    [
        "round_robin",
        "least_loaded",
        "consistent_hash",
        "lora_affinity",
        "lru_multiplex",
        "loragate",
        {
            "filters": [{"name": "max_load"}],
            "scorers": [{"name": "queue"}],
            "picker": "power_of_two",
        },
    ],
    ids=lambda p: p if isinstance(p, str) else "composed",
)
async def test_a_replica_below_the_rank_is_never_asked_to_load_it(
    tmp_path: Path, policy: Any
) -> None:
    # r0 runs --max-lora-rank 8 and its config says so; r1 runs 16 and its config says nothing.
    async with _replicas(8, 16) as urls:
        cfg = _config(tmp_path, [(urls[0], 8), (urls[1], None)], policy)
        # r0 itself refuses the adapter, as vLLM does (what the gateway now spares it).
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                urls[0] + "/v1/load_lora_adapter",
                json={"lora_name": "probe", "lora_path": str(tmp_path / "big")},
            ) as resp,
        ):
            assert resp.status >= 400  # (vLLM 0.32: its 500 InternalServerError)
            assert "max_lora_rank 8" in await resp.text()
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
            served = []
            for i in range(12):  # six adapters nowhere yet: each policy would put some on r0
                raw = await client.completions.with_raw_response.create(
                    model=f"big-{i % 6}", prompt="p", max_tokens=2, stream=i % 2 == 1
                )
                served.append(raw.headers["x-loragate-replica"])
            # Before: r0 was tried for some (a refused load, a retry on r1; remembered after).
            assert served == ["r1"] * 12
            assert await _registered_on(urls[0]) == set()
            text = await metrics_text(gw.url)
            assert "loragate_adapter_load_refusals_total{" not in text
            assert "loragate_upstream_retries_total{" not in text
            # The admin API says which max_lora_rank routing goes by.
            settings = {
                r["id"]: (r["settings"]["max_lora_rank"], r["settings"]["max_lora_rank_known"])
                for r in (await _get(gw.url, "/admin/replicas"))["replicas"]
            }
            assert settings == {"r0": (8, True), "r1": (16, False)}
            # Within its rank, r0 still serves.
            for _ in range(4):
                done = await client.completions.create(model="small", prompt="p", max_tokens=2)
                assert done.model == "small"


async def test_no_healthy_replica_within_the_rank_is_a_503(tmp_path: Path) -> None:
    # r1 (any rank: not said) is down; r0 is up but says --max-lora-rank 8.
    async with _replicas(8) as urls:
        cfg = _config(tmp_path, [(urls[0], 8), (_dead_url(), None)])
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
            with pytest.raises(openai.APIStatusError) as info:
                await client.completions.create(model="big", prompt="p", max_tokens=2)
            # Before: a load on r0, refused: a 502 carrying vLLM's text.
            assert info.value.status_code == 503
            body = info.value.body
            assert isinstance(body, dict) and body["param"] == "model"
            assert body["message"].startswith(
                "no candidate replica can take model 'big': its LoRA rank 16 is above the "
                "max_lora_rank of r0 (8) (policy 'round_robin')"
            ), body["message"]
            assert await _registered_on(urls[0]) == set()
            done = await client.completions.create(model="small", prompt="p", max_tokens=2)
            assert done.model == "small"


async def _register(url: str, spec: dict[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/admin/adapters", headers=AUTH, json=spec) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def test_admin_refuses_a_rank_above_every_known_max_lora_rank(tmp_path: Path) -> None:
    write_adapter_folder(str(tmp_path / "huge"), rank=32)
    async with _replicas(16, 16) as urls:
        cfg = _config(tmp_path, [(urls[0], 16), (urls[1], 16)])
        async with running_gateway(cfg, port=0) as gw:
            # The rank from the folder's adapter_config.json.
            status, body = await _register(gw.url, {"name": "huge", "path": str(tmp_path / "huge")})
            # Before: a load tried on each replica, both refused: a 400 naming vLLM's reasons.
            assert status == 400, body
            error = body["error"]
            assert error["param"] == "rank" and error["type"] == "invalid_request_error"
            message = error["message"]
            assert "adapter 'huge' not registered: its LoRA rank 32 is above" in message
            assert "(r0: 16, r1: 16" in message and "from its adapter_config.json" in message
            # A rank given for a folder the gateway cannot read: the same.
            status, body = await _register(
                gw.url, {"name": "far", "path": "/elsewhere/far", "rank": 64}
            )
            assert status == 400 and body["error"]["param"] == "rank", body
            assert "LoRA rank 64" in body["error"]["message"]
            assert "as given" in body["error"]["message"]
            assert [await _registered_on(u) for u in urls] == [set(), set()]
            assert "loragate_adapter_load_refusals_total{" not in await metrics_text(gw.url)
            listed = {a["name"] for a in (await _get(gw.url, "/admin/adapters"))["adapters"]}
            assert "huge" not in listed and "far" not in listed
            # Within the replicas' rank: registered and loaded as before.
            status, body = await _register(gw.url, {"name": "ok", "path": str(tmp_path / "big")})
            assert status == 201 and body["loaded_on"] == ["r0"], body


async def test_admin_refuses_it_with_every_replica_down(tmp_path: Path) -> None:
    # Before: no replica could be asked, so the registration stood, untried (a 201).
    write_adapter_folder(str(tmp_path / "huge"), rank=32)
    cfg = _config(tmp_path, [(_dead_url(), 16), (_dead_url(), 8)])
    async with running_gateway(cfg, port=0) as gw:
        status, body = await _register(gw.url, {"name": "huge", "path": str(tmp_path / "huge")})
        assert status == 400 and body["error"]["param"] == "rank", body
        assert "(r0: 16, r1: 8" in body["error"]["message"]


async def test_admin_load_passes_over_a_replica_below_the_rank(tmp_path: Path) -> None:
    write_adapter_folder(str(tmp_path / "mid"), rank=16)
    async with _replicas(8, 16) as urls:
        cfg = _config(tmp_path, [(urls[0], 8), (urls[1], None)])
        async with running_gateway(cfg, port=0) as gw:
            status, body = await _register(gw.url, {"name": "mid", "path": str(tmp_path / "mid")})
            assert status == 201, body
            # Before: r0 was asked first and refused (refused_by r0, vLLM's text).
            assert body["loaded_on"] == ["r1"] and body["refused_by"] == {}
            assert body["not_tried"] == {"r0": "its max_lora_rank 8 is below rank 16"}
            assert [await _registered_on(u) for u in urls] == [set(), {"mid"}]
