"""``POST /tokenize``, ``POST /detokenize`` and ``GET /version`` through the gateway, over
loopback, to simulated vLLM 0.32 replicas (``loragate.twin``, which answer them as real vLLM
does: ``bench/vllm_cpu/tokenize_transcript.md``). Before, the gateway answered each with its 404
``no such endpoint``. Clients use aiohttp: the openai SDK has no such calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_harness import gateway_config

from loragate.cli import main
from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica

BASE = "tiny-llama"
PROMPT = "Hello world the adapter"


class Fleet:
    """Two simulated replicas r0, r1 (each can be stopped alone) and adapter folders."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.replicas: list[RunningReplica] = []
        self.stops: list[contextlib.AsyncExitStack] = []

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def config(self, **sections: Any) -> Any:
        adapters = [{"name": f"lora-{i}", "path": self.path(f"lora-{i}")} for i in range(3)]
        return gateway_config([r.url for r in self.replicas], **{"adapters": adapters, **sections})

    async def register(self, index: int, name: str) -> None:
        body = {"lora_name": name, "lora_path": self.path(name)}
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.replicas[index].url + "/v1/load_lora_adapter", json=body) as resp,
        ):
            assert resp.status == 200, await resp.text()

    async def unregister(self, index: int, name: str) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                self.replicas[index].url + "/v1/unload_lora_adapter", json={"lora_name": name}
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()

    async def registered(self, index: int) -> set[str]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.replicas[index].url + "/v1/models") as resp,
        ):
            return {m["id"] for m in (await resp.json())["data"] if m["parent"] is not None}


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    for i in range(3):
        write_adapter_folder(str(tmp_path / f"lora-{i}"), rank=8)
    async with contextlib.AsyncExitStack() as stack:
        f = Fleet(tmp_path)
        for seed in range(2):
            own = contextlib.AsyncExitStack()
            stack.push_async_callback(own.aclose)
            cfg = ReplicaConfig(
                served_model_name=BASE, enable_lora=True, max_loras=2, max_lora_rank=16,
                max_model_len=512, seed=seed,
            )  # fmt: skip
            f.replicas.append(await own.enter_async_context(run_replica(cfg, port=0)))
            f.stops.append(own)
        yield f


async def post(
    url: str, body: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as http, http.post(url, data=data, headers=sent) as resp:
        return (
            resp.status,
            {k.lower(): v for k, v in resp.headers.items()},
            json.loads(await resp.read()),
        )


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        return await resp.text()


async def test_tokenize_detokenize_and_version_answer_as_the_replica_does(fleet: Fleet) -> None:
    await fleet.register(1, "lora-0")
    async with running_gateway(fleet.config(), port=0) as gw:
        direct = await post(fleet.replicas[0].url + "/tokenize", {"model": BASE, "prompt": PROMPT})
        base = await post(gw.url + "/tokenize", {"model": BASE, "prompt": PROMPT})
        adapter = await post(
            gw.url + "/tokenize", {"model": "lora-0", "prompt": PROMPT},
            headers={"X-Request-Id": "tok-1"},
        )  # fmt: skip
        chat = await post(
            gw.url + "/tokenize",
            {"model": "lora-0", "messages": [{"role": "user", "content": "hi"}]},
        )
        ids = {"model": "lora-0", "tokens": direct[2]["tokens"]}
        detok = await post(gw.url + "/detokenize", ids)
        detok_direct = await post(fleet.replicas[1].url + "/detokenize", ids)
        async with aiohttp.ClientSession() as http, http.get(gw.url + "/version") as resp:
            version = (resp.status, await resp.json(), resp.headers.get("X-Request-Id"))
        scraped = await metrics(gw.url)
    assert base[0] == 200 and base[2] == direct[2] and base[2]["count"] == 4
    assert base[1]["x-request-id"] and base[1]["x-loragate-replica"] in ("r0", "r1")
    # the adapter goes to the replica that has it registered; it tokenizes as the base model
    assert adapter[0] == 200 and adapter[2] == direct[2]
    assert adapter[1]["x-loragate-replica"] == "r1" and adapter[1]["x-request-id"] == "tok-1"
    assert chat[0] == 200 and chat[2]["count"] == 4
    assert detok[0] == 200 and detok[2] == detok_direct[2] and detok[2]["prompt"]
    assert version[0] == 200 and version[1] == {"version": "0.32.0"} and version[2]
    assert (
        'loragate_tokenizer_requests_total{endpoint="tokenize",replica="r1",status="200"}'
        in scraped
    )
    assert 'loragate_tokenizer_requests_total{endpoint="version",' in scraped
    # not generations: no completion counted, no routing decision for an adapter
    assert "loragate_requests_total{" not in scraped
    residency = [
        ln for ln in scraped.splitlines() if ln.startswith("loragate_routing_residency_total{")
    ]
    assert residency and all(ln.endswith(" 0.0") for ln in residency)


async def test_an_adapter_registered_nowhere_is_tokenized_without_a_load(fleet: Fleet) -> None:
    async with running_gateway(fleet.config(), port=0) as gw:
        got = await post(gw.url + "/tokenize", {"model": "lora-2", "prompt": PROMPT})
        base = await post(gw.url + "/tokenize", {"prompt": PROMPT})
        loads = "loragate_adapter_loads_total"
        scraped = await metrics(gw.url)
    assert got[0] == 200 and got[2] == base[2]  # the base model's tokenizer, as vLLM's
    assert await fleet.registered(0) == set() and await fleet.registered(1) == set()
    assert f'{loads}{{replica="r0"}} 0.0' in scraped and f'{loads}{{replica="r1"}} 0.0' in scraped


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code"),
    [
        ("/tokenize", {"model": "nope", "prompt": "x"}, {}, 404, 404),  # vLLM's (an int)
        ("/detokenize", {"model": "nope", "tokens": [1]}, {}, 404, 404),
        ("/tokenize", b"{nope", {}, 400, 400),
        ("/tokenize", b"[1]", {}, 400, 400),
        ("/tokenize", {"model": 5, "prompt": "x"}, {}, 400, 400),
        ("/tokenize", {"model": BASE}, {}, 400, 400),
        ("/tokenize", b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 400, 400),
        ("/detokenize", {"tokens": [-1]}, {}, 400, 400),
        ("/tokenize", b"", {}, 400, 400),
    ],
)
async def test_bad_input_is_refused_in_the_openai_shape(
    fleet: Fleet, path: str, body: Any, headers: dict[str, str], status: int, code: Any
) -> None:
    raw = body if isinstance(body, bytes) else None
    async with running_gateway(fleet.config(), port=0) as gw:
        got = await post(gw.url + path, None if raw is not None else body, raw=raw,
                         headers={"X-Request-Id": "bad-1", **headers})  # fmt: skip
        direct = await post(fleet.replicas[0].url + path, None if raw is not None else body,
                            raw=raw, headers=headers)  # fmt: skip
        ok = await post(gw.url + "/tokenize", {"prompt": "x"})  # the gateway keeps serving
        scraped = await metrics(gw.url)
    assert got[0] == status and got[1]["x-request-id"] == "bad-1"
    assert list(got[2]) == ["error"] and got[2]["error"]["code"] == code
    assert set(got[2]["error"]) == {"message", "type", "param", "code"}
    if status == 400:  # vLLM's own answer, word for word
        assert got[2] == direct[2]
    assert ok[0] == 200
    assert f'endpoint="{path[1:]}",replica="",status="{status}"' in scraped


async def test_tenant_keys_apply_and_other_tenants_adapters_stay_invisible(fleet: Fleet) -> None:
    cfg = fleet.config(
        tenants=[
            {"name": "acme", "api_keys": ["sk-acme"]},
            {"name": "beta", "api_keys": ["sk-beta"]},
        ],
        adapters=[
            {"name": "acme-lora", "path": fleet.path("lora-0"), "tenants": ["acme"]},
            {"name": "beta-lora", "path": fleet.path("lora-1"), "tenants": ["beta"]},
        ],
    )
    acme = {"Authorization": "Bearer sk-acme"}
    async with running_gateway(cfg, port=0) as gw:
        none = await post(gw.url + "/tokenize", {"prompt": "x"})
        wrong = await post(
            gw.url + "/detokenize", {"tokens": [1]}, headers={"Authorization": "Bearer x"}
        )
        own = await post(gw.url + "/tokenize", {"model": "acme-lora", "prompt": "x"}, headers=acme)
        other = await post(
            gw.url + "/tokenize", {"model": "beta-lora", "prompt": "x"}, headers=acme
        )
        async with aiohttp.ClientSession() as http, http.get(gw.url + "/version") as resp:
            version = resp.status  # open, as vLLM's (its --api-key guards only /v1/...)
    assert none[0] == 401 and none[2]["error"]["code"] == "invalid_api_key"
    assert wrong[0] == 401
    assert own[0] == 200
    assert other[0] == 404 and other[2]["error"] == {  # vLLM 0.32's answer, word for word
        "message": f"The model `beta-lora` does not exist. Valid aliases: {BASE}.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    assert version == 200


async def test_a_refused_connection_goes_elsewhere_and_a_forgotten_adapter_asks_as_base(
    fleet: Fleet,
) -> None:
    await fleet.register(0, "lora-0")
    await fleet.register(1, "lora-1")
    async with running_gateway(fleet.config(), port=0) as gw:
        pool = gw.gateway.pool
        assert pool.is_registered("r0", "lora-0") and pool.is_registered("r1", "lora-1")
        # r1 forgets lora-1 behind the gateway's back: its 404 -> asked again as the base model
        await fleet.unregister(1, "lora-1")
        forgotten = await post(gw.url + "/tokenize", {"model": "lora-1", "prompt": PROMPT})
        assert not pool.is_registered("r1", "lora-1")
        # r0 (which holds lora-0: tried first) stops; the gateway has not polled since
        await fleet.stops[0].aclose()
        retried = await post(gw.url + "/tokenize", {"model": "lora-0", "prompt": PROMPT})
        healthy = pool.is_healthy("r0")
        scraped = await metrics(gw.url)
    assert forgotten[0] == 200 and forgotten[1]["x-loragate-replica"] == "r1"
    assert retried[0] == 200 and retried[1]["x-loragate-replica"] == "r1"
    assert retried[2]["count"] == 4
    assert not healthy  # reported to the pool: out of rotation until a poll succeeds
    assert 'loragate_upstream_retries_total{reason="connect",replica="r0"} 1.0' in scraped
    assert 'loragate_upstream_retries_total{reason="adapter_missing",replica="r1"} 1.0' in scraped


async def test_no_healthy_replica_is_a_503_and_a_lone_dead_one_a_502(fleet: Fleet) -> None:
    cfg = fleet.config(replicas=[{"id": "r0", "url": fleet.replicas[0].url}])
    async with running_gateway(cfg, port=0) as gw:
        await fleet.stops[0].aclose()
        dead = await post(gw.url + "/tokenize", {"prompt": "x"})
        after = await post(gw.url + "/tokenize", {"prompt": "x"})
    assert dead[0] == 502 and dead[1]["x-loragate-replica"] == "r0"
    assert "127.0.0.1" not in dead[2]["error"]["message"]  # the replica's id, not its URL
    assert after[0] == 503 and after[2]["error"]["code"] == "no_replica_available"


LOADTEST_SPEC = """\
name: tiny
seed: 5
duration_s: 2
adapters: {count: 1, base_fraction: 0.5}
arrivals: {process: poisson, rate_rps: 20}
lengths: {prompt: 100, output: 2}
"""


async def test_loadtest_through_the_gateway_measures_the_prompts_tokens(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: "prompts   one word per spec token, not measured by the target (POST
    # http://127.0.0.1:PORT/tokenize answered 404)".
    spec = tmp_path / "tiny.yaml"
    spec.write_text(LOADTEST_SPEC, encoding="utf-8")
    cfg = fleet.config(tenants=[{"name": "acme", "api_keys": ["sk-acme"]}])
    async with running_gateway(cfg, port=0) as gw:
        args = ["loadtest", "--progress-s", "0", "--url", gw.url + "/v1", "--api-key", "sk-acme",
                "--workload", str(spec), "--base-only", "--no-stream", "--max-requests", "4",
                "--timeout-s", "20", "--json", str(tmp_path / "summary.json")]  # fmt: skip
        code = await asyncio.to_thread(main, args)
    out = capsys.readouterr().out
    assert code == 0, out
    measured = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["prompt_tokens"]
    assert measured["source"] == "POST /tokenize" and measured["not_measured"] is None
    assert measured["target_tokens"] == measured["words"] and measured["max_model_len"] == 512
    assert "tokens for the target's tokenizer (1.00 per word, POST /tokenize, context 512" in out
