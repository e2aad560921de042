"""Replica under load: deferred requests, lora_requests_info, /load, disconnects, resolver."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from loragate.backends.metrics import parse_vllm_metrics

StartReplica = Callable[..., Any]
MakeAdapterDir = Callable[..., str]
MODEL_PATH = "/models/tiny-llama"
POLLS = 400  # every wait below is bounded by a count of polls


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=1.0.0; charset=utf-8"
        return await resp.text()


async def long_request(http: aiohttp.ClientSession, url: str, model: str, tokens: int) -> int:
    body = {"model": model, "prompt": "x y z", "max_tokens": tokens, "ignore_eos": True}
    async with http.post(url + "/v1/completions", json=body) as resp:
        return int((await resp.json())["usage"]["completion_tokens"])


async def test_more_adapters_than_max_loras_are_deferred(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    # Real time (time_scale 1): each wave of 100 tokens keeps the third adapter deferred for a
    # few hundred milliseconds, plenty for a scrape even on a busy machine.
    async with start_replica(max_loras=2, time_scale=1.0) as r:
        for name in ("lora-0", "lora-1", "lora-2"):
            r.state.registry.load(name, adapter_dir(name))
        tasks = [
            asyncio.create_task(long_request(http, r.url, name, 100))
            for name in ("lora-0", "lora-1", "lora-2")
            for _ in range(2)
        ]
        seen_deferred, seen_current = 0, ()
        try:
            for _ in range(POLLS):
                metrics = parse_vllm_metrics(await scrape(http, r.url))
                if metrics.num_deferred > 0 and metrics.running_adapters:
                    seen_deferred = metrics.num_deferred
                    seen_current = metrics.running_adapters
                    assert metrics.running_adapters == metrics.waiting_adapters
                    break
                await asyncio.sleep(0.005)
        finally:
            results = await asyncio.gather(*tasks)
        assert seen_deferred > 0
        assert 1 <= len(seen_current) <= 2
        assert results == [100] * 6
        # Every combination stays exported; the newest one is the idle state "" after the run.
        text = await scrape(http, r.url)
        lines = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
        assert len(lines) >= 3
        final = parse_vllm_metrics(text)
        assert final.running_adapters == () and final.max_loras == 2
        assert final.num_running == final.num_waiting == 0


async def test_server_load_tracking(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    async def load(url: str) -> int:
        async with http.get(url + "/load") as resp:
            return int((await resp.json())["server_load"])

    for tracking in (True, False):
        async with start_replica(enable_server_load_tracking=tracking, time_scale=2.0) as r:
            task = asyncio.create_task(long_request(http, r.url, "tiny-llama", 200))
            peak = 0
            for _ in range(POLLS):
                peak = max(peak, await load(r.url))
                if peak or task.done():
                    break
                await asyncio.sleep(0.002)
            await task
            assert peak == (1 if tracking else 0)
            assert await load(r.url) == 0


async def test_client_disconnect_aborts_engine_request(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    async with start_replica(time_scale=1.0) as r:
        body = {"prompt": "abort me", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with http.post(r.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")  # first token arrived
            assert r.state.engine.has_unfinished()
            resp.close()  # drop the connection mid-stream
        for _ in range(POLLS):
            if not r.state.engine.has_unfinished():
                break
            await asyncio.sleep(0.005)
        assert not r.state.engine.has_unfinished()
        assert r.state.counters.success_by_reason.get("abort") == 1
        assert r.state.counters.generation_tokens_total < 400


async def test_filesystem_resolver(
    start_replica: StartReplica,
    http: aiohttp.ClientSession,
    adapter_dir: MakeAdapterDir,
    tmp_path: Path,
) -> None:
    adapter_dir("lora-4", 8, base_model_name_or_path=MODEL_PATH)
    adapter_dir("lora-2", 8, base_model_name_or_path=MODEL_PATH)
    adapter_dir("lora-3-mismatch", 8, base_model_name_or_path="tiny-llama")
    async with start_replica(resolver_dir=str(tmp_path / "loras")) as r:
        body = {"model": "lora-4", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        async with http.post(r.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200 and (await resp.json())["model"] == "lora-4"
        chat = {"model": "lora-2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with http.post(r.url + "/v1/chat/completions", json=chat) as resp:
            assert resp.status == 200
        for missing in ("lora-3-mismatch", "not-a-dir"):
            async with http.post(
                r.url + "/v1/completions", json={**body, "model": missing}
            ) as resp:
                assert resp.status == 404
                err = (await resp.json())["error"]
                assert err["message"] == (
                    f"The model `{missing}` does not exist. Valid aliases: tiny-llama."
                )
        async with http.get(r.url + "/v1/models") as resp:
            cards = (await resp.json())["data"]
        assert [c["id"] for c in cards] == ["tiny-llama", "lora-4", "lora-2"]
        assert cards[1]["root"] == str(tmp_path / "loras" / "lora-4")


async def test_lora_modules_at_startup_and_lora_disabled(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    from loragate.twin.replica_config import LoraModule

    module = LoraModule(name="pre", path=adapter_dir("pre"))
    async with start_replica(lora_modules=(module,)) as r:
        cards = await (await http.get(r.url + "/v1/models")).json()
        assert [c["id"] for c in cards["data"]] == ["tiny-llama", "pre"]
    async with start_replica(enable_lora=False) as r:
        text = await scrape(http, r.url)
        assert "vllm:num_requests_running{" in text and "lora_requests_info" not in text
        body = {"lora_name": "a", "lora_path": adapter_dir("a")}
        async with http.post(r.url + "/v1/load_lora_adapter", json=body) as resp:
            # vLLM 0.32's answer, byte for byte (bench/vllm_cpu/lora_off_transcript.md)
            assert resp.status == 500
            assert await resp.read() == (
                b'{"error":{"message":"Call to add_lora method failed: Worker failed with '
                b"error 'LoRA is not enabled. Use --enable-lora to enable LoRA.', please "
                b'check the stack trace above for the root cause","type":"InternalServerError"'
                b',"param":null,"code":500}}'
            )


async def test_without_runtime_lora_updating_the_admin_routes_are_fastapis_404(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    """vLLM 0.32 without VLLM_ALLOW_RUNTIME_LORA_UPDATING=True has no load/unload routes: a
    404 ``{"detail":"Not Found"}`` (bench/vllm_cpu/lora_off_transcript.md); adapters given at
    start-up are served."""
    from loragate.twin.replica_config import LoraModule

    module = LoraModule(name="pre", path=adapter_dir("pre"))
    async with start_replica(runtime_lora_updating=False, lora_modules=(module,)) as r:
        body = {"lora_name": "a", "lora_path": adapter_dir("a")}
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            async with http.post(r.url + path, json=body) as resp:
                assert (resp.status, await resp.read()) == (404, b'{"detail":"Not Found"}')
        done = {"model": "pre", "prompt": "hi", "max_tokens": 2}
        async with http.post(r.url + "/v1/completions", json=done) as resp:
            assert resp.status == 200


async def test_non_streaming_client_timeout_aborts(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    async with start_replica(time_scale=1.0) as r:
        body = {"prompt": "slow", "max_tokens": 400, "ignore_eos": True}
        timeout = aiohttp.ClientTimeout(total=0.1)
        try:
            async with http.post(r.url + "/v1/completions", json=body, timeout=timeout) as resp:
                await resp.read()
            raise AssertionError("the request should have timed out")
        except TimeoutError:
            pass
        for _ in range(POLLS):
            if not r.state.engine.has_unfinished():
                break
            await asyncio.sleep(0.005)
        assert not r.state.engine.has_unfinished()
        assert r.state.counters.success_by_reason.get("abort") == 1
