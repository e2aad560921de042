"""Real vLLM 0.32 (CPU) answers the API calls loragate relies on as recorded in
shared/design/VLLM_API.md §4. If one of these fails, the contract our client and simulated
replica implement has drifted from the real server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from vllm_e2e import BASE

from loragate.twin.measure_client import parse_metrics
from vllm_cpu.replica import Replica

pytestmark = pytest.mark.vllm

ERROR_KEYS = {"message", "type", "param", "code"}


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str]:
    async with http.post(url, json=body) as r:
        return r.status, await r.text()


def _error(text: str) -> dict[str, Any]:
    body = json.loads(text)
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    err: dict[str, Any] = body["error"]
    return err


async def _load(http: aiohttp.ClientSession, rep: Replica, name: str, path: str) -> tuple[int, str]:
    return await _post(
        http, f"{rep.base_url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}
    )


async def _complete(
    http: aiohttp.ClientSession, rep: Replica, model: str, max_tokens: int = 6, **extra: Any
) -> tuple[int, dict[str, Any]]:
    body = {
        "model": model,
        "prompt": "hello world the",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }
    async with http.post(f"{rep.base_url}/v1/completions", json=body) as r:
        return r.status, await r.json(content_type=None)


async def test_models_and_version(real_vllm: Replica, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{real_vllm.base_url}/v1/models") as r:
        assert r.status == 200
        models = await r.json()
    assert models["object"] == "list"
    base = next(m for m in models["data"] if m["id"] == BASE)
    assert base["parent"] is None and base["max_model_len"] == 512
    async with http.get(f"{real_vllm.base_url}/version") as r:
        assert (await r.json()) == {"version": "0.32.0"}
    async with http.get(f"{real_vllm.base_url}/health") as r:
        assert r.status == 200


async def test_load_adapter_and_complete_with_it(
    real_vllm: Replica,
    http: aiohttp.ClientSession,
    lora_paths: dict[int, list[str]],
    unique_name: str,
) -> None:
    status, text = await _load(http, real_vllm, unique_name, lora_paths[8][0])
    assert (status, text) == (200, f"Success: LoRA adapter '{unique_name}' added successfully.")
    async with http.get(f"{real_vllm.base_url}/v1/models") as r:
        cards = {m["id"]: m for m in (await r.json())["data"]}
    assert cards[unique_name]["parent"] == BASE
    assert cards[unique_name]["root"] == lora_paths[8][0]
    status, done = await _complete(http, real_vllm, unique_name, max_tokens=6)
    assert status == 200 and done["model"] == unique_name
    assert done["usage"]["completion_tokens"] == 6
    assert done["choices"][0]["finish_reason"] == "length"
    # the adapter really changes the greedy output (random non-zero LoRA weights)
    status, base = await _complete(http, real_vllm, BASE, max_tokens=6)
    assert status == 200 and base["choices"][0]["text"] != done["choices"][0]["text"]


async def test_admin_errors_have_the_recorded_status_and_shape(
    real_vllm: Replica,
    http: aiohttp.ClientSession,
    lora_paths: dict[int, list[str]],
    unique_name: str,
    tmp_path: Any,
) -> None:
    url = f"{real_vllm.base_url}/v1/load_lora_adapter"
    assert (await _load(http, real_vllm, unique_name, lora_paths[16][0]))[0] == 200
    status, text = await _load(http, real_vllm, unique_name, lora_paths[16][0])
    assert status == 400 and "has already been loaded" in _error(text)["message"]
    assert _error(text)["type"] == "InvalidUserInput"
    status, text = await _load(http, real_vllm, unique_name + "-x", str(tmp_path / "nope"))
    assert status == 404 and _error(text)["type"] == "NotFoundError"
    assert _error(text)["message"].endswith("No adapter found for <path>")
    status, text = await _load(http, real_vllm, BASE, lora_paths[8][0])
    assert status == 400 and "conflicts with a served base model" in _error(text)["message"]
    status, text = await _post(http, url, {"lora_name": unique_name + "-y"})
    assert status == 400 and _error(text)["param"] == "body.lora_path"
    status, text = await _post(http, url, {"lora_name": unique_name + "-z", "lora_path": ""})
    assert status == 400 and "must be provided" in _error(text)["message"]
    status, text = await _post(
        http, f"{real_vllm.base_url}/v1/unload_lora_adapter", {"lora_name": unique_name + "-never"}
    )
    assert status == 404 and "cannot be found" in _error(text)["message"]
    status, text = await _post(
        http, f"{real_vllm.base_url}/v1/unload_lora_adapter", {"lora_name": unique_name}
    )
    assert (status, text) == (200, f"Success: LoRA adapter '{unique_name}' removed successfully.")


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_a_json_404_even_when_streaming(
    real_vllm: Replica, http: aiohttp.ClientSession, stream: bool
) -> None:
    body = {"model": "no-such-adapter", "prompt": "x", "max_tokens": 2, "stream": stream}
    async with http.post(f"{real_vllm.base_url}/v1/completions", json=body) as r:
        assert r.status == 404
        assert r.content_type == "application/json"
        err = _error(await r.text())
    assert err["message"] == (f"The model `no-such-adapter` does not exist. Valid aliases: {BASE}.")
    assert err["param"] == "model" and err["code"] == 404


async def test_stream_with_usage_ends_with_usage_chunk_then_done(
    real_vllm: Replica, http: aiohttp.ClientSession
) -> None:
    """5 tokens stream as 1 to 5 text chunks, then the usage chunk, then ``[DONE]``. Not one chunk
    per token: vLLM V1's API server merges the deltas of engine steps its consumer has not read
    yet into one (vllm/v1/engine/output_processor.py RequestOutputCollector.put ->
    vllm/outputs.py RequestOutput.add(aggregate=True) for DELTA outputs: texts and token ids
    concatenated, the last finish_reason kept), so a loaded machine sees fewer, longer chunks."""
    body = {
        "model": BASE,
        "prompt": "hello",
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
    }
    status, whole = await _post(http, f"{real_vllm.base_url}/v1/completions", body)
    assert status == 200
    events: list[str] = []
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{real_vllm.base_url}/v1/completions", json=stream) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append(line[5:].strip())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    text_chunks = chunks[:-1]
    assert 1 <= len(text_chunks) <= 5 and all(c["choices"] for c in text_chunks), text_chunks
    texts = "".join(c["choices"][0]["text"] for c in text_chunks)
    assert texts == json.loads(whole)["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1]), text_chunks


async def test_max_loras_budget_defers_the_third_adapter(
    real_vllm: Replica,
    http: aiohttp.ClientSession,
    lora_paths: dict[int, list[str]],
    unique_name: str,
) -> None:
    """3 adapters, max_loras 2: requests of the third wait with reason="deferred"."""
    names = [f"{unique_name}-{i}" for i in range(3)]
    for i, n in enumerate(names):
        assert (await _load(http, real_vllm, n, lora_paths[8][i % len(lora_paths[8])]))[0] == 200
    jobs = [
        asyncio.create_task(_complete(http, real_vllm, n, max_tokens=400))
        for n in names
        for _ in range(2)
    ]
    max_deferred = 0.0
    for _ in range(2000):  # bounded: stops when the requests are done
        async with http.get(f"{real_vllm.base_url}/metrics") as r:
            m = parse_metrics(await r.text())
        max_deferred = max(max_deferred, m.get("deferred", 0.0))
        if all(j.done() for j in jobs):
            break
        await asyncio.sleep(0.02)
    results = await asyncio.gather(*jobs)
    assert [s for s, _ in results] == [200] * 6
    assert all(b["usage"]["completion_tokens"] == 400 for _, b in results)
    assert max_deferred >= 1
