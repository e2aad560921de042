"""``POST /tokenize``, ``POST /detokenize`` and ``GET /version`` through the gateway in front of a
REAL vLLM CPU replica: each answer equals vLLM's own to the same request, an adapter the replica
has registered is sent as is, one it has not is tokenized as the base model without being
registered (vLLM would answer 404, or load it through a resolver), and ``loragate loadtest``'s
prompt-token probe gets the same count through the gateway as from vLLM. What vLLM answers is
recorded in ``bench/vllm_cpu/tokenize_transcript.md``."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from vllm_e2e import BASE

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from loragate.loadtest.prompt_tokens import measure_prompt_tokens
from vllm_cpu.replica import Replica

pytestmark = pytest.mark.vllm

PROMPT = "Hello world the adapter"


async def _post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, data=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
        return resp.status, json.loads(await resp.read())


async def _registered(http: aiohttp.ClientSession, rep: Replica) -> set[str]:
    async with http.get(f"{rep.base_url}/v1/models") as r:
        return {m["id"] for m in (await r.json())["data"] if m["parent"] is not None}


async def test_the_gateways_tokenize_answers_are_vllms(
    real_vllm: Replica,
    http: aiohttp.ClientSession,
    lora_paths: dict[int, list[str]],
    unique_name: str,
) -> None:
    held, elsewhere = f"{unique_name}-held", f"{unique_name}-not-held"
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": "real0", "url": real_vllm.base_url}],
        "adapters": [
            {"name": held, "path": lora_paths[8][0], "rank": 8},
            {"name": elsewhere, "path": lora_paths[16][0], "rank": 16},
        ],
        "poller": {"interval_s": 0.5},
    }
    load = {"lora_name": held, "lora_path": lora_paths[8][0]}
    async with http.post(real_vllm.base_url + "/v1/load_lora_adapter", json=load) as resp:
        assert resp.status == 200, await resp.text()  # (a plain-text success body)
    chat = [{"role": "user", "content": "hi"}]
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("/tokenize", {"model": BASE, "prompt": PROMPT}),
        ("/tokenize", {"prompt": PROMPT, "return_token_strs": True}),
        ("/tokenize", {"model": held, "prompt": PROMPT}),
        ("/tokenize", {"model": held, "messages": chat}),
        ("/tokenize", {"messages": chat, "add_generation_prompt": False}),
        ("/tokenize", {"model": BASE}),  # vLLM's 400, word for word
        ("/detokenize", {"model": held, "tokens": [630, 410, 276, 471]}),
        ("/detokenize", {"tokens": [-1]}),
    ]
    async with running_gateway(config_from_mapping(doc), port=0) as gw:
        for path, body in bodies:
            direct = await _post(http, real_vllm.base_url + path, body)
            through = await _post(http, gw.url + path, body)
            assert through == direct, (path, body)
        # an adapter the replica has not registered: vLLM alone says 404; through the gateway
        # it is tokenized as the base model, and nothing is registered or loaded for it
        alone = await _post(
            http, real_vllm.base_url + "/tokenize", {"model": elsewhere, "prompt": PROMPT}
        )
        through = await _post(http, gw.url + "/tokenize", {"model": elsewhere, "prompt": PROMPT})
        base = await _post(http, real_vllm.base_url + "/tokenize", {"prompt": PROMPT})
        assert alone[0] == 404 and through == base
        assert elsewhere not in await _registered(http, real_vllm)
        unknown = await _post(
            http, gw.url + "/tokenize", {"model": f"{unique_name}-x", "prompt": "x"}
        )
        assert unknown[0] == 404 and unknown[1]["error"]["param"] == "model"
        async with (
            http.get(gw.url + "/version") as r1,
            http.get(real_vllm.base_url + "/version") as r2,
        ):
            assert (r1.status, await r1.json()) == (r2.status, await r2.json())
        # the load test's probe (one prompt of 256 words) counts the same through the gateway
        probes = [
            await measure_prompt_tokens(url + "/v1", model=BASE, api_key=None, timeout_s=60.0)
            for url in (real_vllm.base_url, gw.url)
        ]
    assert probes[0].tokens is not None and probes[0] == probes[1]
    assert probes[1].max_model_len == 512
