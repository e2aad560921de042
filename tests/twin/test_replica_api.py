"""The replica's API checked against shared/design/vllm-0.32/transcript_*.md, over loopback."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from loragate.twin.synthetic_text import completion_prompt_tokens

MakeAdapterDir = Callable[..., str]
StartReplica = Callable[..., Any]
BASE = "tiny-llama"
MODEL_PATH = "/models/tiny-llama"
PERMISSION_KEYS = [
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
]


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, str | None, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    async with http.request(method, url, data=data, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type"), await resp.read()


def error_of(body: bytes) -> Mapping[str, Any]:
    payload = json.loads(body)
    assert list(payload) == ["error"]
    assert list(payload["error"]) == ["message", "type", "param", "code"]
    return payload["error"]  # type: ignore[no-any-return]


async def test_health_ping_version_load(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    async with start_replica() as r:
        assert await call(http, "GET", r.url + "/health") == (200, None, b"")
        assert await call(http, "GET", r.url + "/ping") == (200, None, b"")
        assert await call(http, "GET", r.url + "/version") == (
            200,
            "application/json",
            b'{"version":"0.32.0"}',
        )
        assert await call(http, "GET", r.url + "/load") == (
            200,
            "application/json",
            b'{"server_load":0}',
        )


async def test_models_cards(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    path = adapter_dir("lora-0", 8)
    async with start_replica() as r:
        status, ctype, body = await call(http, "GET", r.url + "/v1/models")
        assert (status, ctype) == (200, "application/json")
        listing = json.loads(body)
        assert listing["object"] == "list" and len(listing["data"]) == 1
        base = listing["data"][0]
        assert list(base) == [
            "id",
            "object",
            "created",
            "owned_by",
            "root",
            "parent",
            "max_model_len",
            "permission",
        ]
        assert (base["id"], base["root"], base["parent"], base["max_model_len"]) == (
            BASE,
            MODEL_PATH,
            None,
            512,
        )
        assert base["owned_by"] == "vllm" and base["object"] == "model"
        perm = base["permission"][0]
        assert list(perm) == PERMISSION_KEYS and re.fullmatch(r"modelperm-[0-9a-f]{16}", perm["id"])
        await call(
            http,
            "POST",
            r.url + "/v1/load_lora_adapter",
            {"lora_name": "lora-0", "lora_path": path},
        )
        await call(
            http,
            "POST",
            r.url + "/v1/load_lora_adapter",
            {"lora_name": "lora-0-alias", "lora_path": path},
        )
        _, _, body = await call(http, "GET", r.url + "/v1/models")
        cards = json.loads(body)["data"]
        assert [c["id"] for c in cards] == [BASE, "lora-0", "lora-0-alias"]
        for card in cards[1:]:
            assert (card["root"], card["parent"], card["max_model_len"]) == (path, BASE, None)


async def test_load_and_unload_adapter_cases(
    start_replica: StartReplica,
    http: aiohttp.ClientSession,
    adapter_dir: MakeAdapterDir,
    tmp_path: Path,
) -> None:
    path = adapter_dir("lora-0", 8)
    load = "/v1/load_lora_adapter"
    async with start_replica() as r:
        ok = await call(http, "POST", r.url + load, {"lora_name": "lora-0", "lora_path": path})
        assert ok == (200, None, b"Success: LoRA adapter 'lora-0' added successfully.")

        status, ctype, body = await call(
            http, "POST", r.url + load, {"lora_name": "lora-0", "lora_path": path}
        )
        assert (status, ctype) == (400, "application/json")
        assert error_of(body) == {
            "message": "The lora adapter 'lora-0' has already been loaded. If you want to load "
            "the adapter in place, set 'load_inplace' to True.",
            "type": "InvalidUserInput",
            "param": None,
            "code": 400,
        }
        inplace = {"lora_name": "lora-0", "lora_path": path, "load_inplace": True}
        assert (await call(http, "POST", r.url + load, inplace))[0] == 200

        status, _, body = await call(
            http,
            "POST",
            r.url + load,
            {"lora_name": "nope", "lora_path": str(tmp_path / "missing")},
        )
        assert status == 404
        assert error_of(body) == {
            "message": "Loading lora nope failed: No adapter found for <path>",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
        status, _, body = await call(
            http, "POST", r.url + load, {"lora_name": "notlora", "lora_path": str(tmp_path)}
        )
        assert status == 404 and "No adapter found for <path>" in error_of(body)["message"]

        status, _, body = await call(
            http, "POST", r.url + load, {"lora_name": BASE, "lora_path": path}
        )
        assert status == 400
        assert (
            error_of(body)["message"]
            == f"The lora adapter '{BASE}' conflicts with a served base model."
        )

        status, _, body = await call(http, "POST", r.url + load, {"lora_name": "x"})
        assert status == 400
        assert error_of(body) == {
            "message": "1 validation error:\n  {'type': 'missing', 'loc': 'body.lora_path', "
            "'msg': 'Field required', 'input': '<dict of 1 items>'}",
            "type": "Bad Request",
            "param": "body.lora_path",
            "code": 400,
        }
        status, _, body = await call(
            http, "POST", r.url + load, {"lora_name": "x", "lora_path": ""}
        )
        assert status == 400
        assert error_of(body)["message"] == "Both 'lora_name' and 'lora_path' must be provided."
        assert error_of(body)["type"] == "InvalidUserInput"

        big = adapter_dir("big", 32)
        status, _, body = await call(
            http, "POST", r.url + load, {"lora_name": "big", "lora_path": big}
        )
        assert status == 500 and "greater than max_lora_rank 16" in error_of(body)["message"]

        unload = "/v1/unload_lora_adapter"
        assert await call(http, "POST", r.url + unload, {"lora_name": "lora-0"}) == (
            200,
            None,
            b"Success: LoRA adapter 'lora-0' removed successfully.",
        )
        status, _, body = await call(http, "POST", r.url + unload, {"lora_name": "lora-0"})
        assert status == 404
        assert error_of(body) == {
            "message": "The lora adapter 'lora-0' cannot be found.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
        status, _, body = await call(http, "POST", r.url + unload, {})
        assert status == 400
        assert error_of(body)["param"] == "body.lora_name"
        assert "'input': '<dict of 0 items>'" in error_of(body)["message"]

        status, _, body = await call(
            http,
            "POST",
            r.url + "/v1/completions",
            {"model": "lora-0", "prompt": "hi", "max_tokens": 4},
        )
        assert status == 404
        assert (
            error_of(body)["message"]
            == "The model `lora-0` does not exist. Valid aliases: tiny-llama."
        )


async def test_sagemaker_aliases(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    async with start_replica() as r:
        ok = await call(
            http, "POST", r.url + "/adapters", {"name": "lora-3", "src": adapter_dir("lora-3")}
        )
        assert ok == (200, None, b"Adapter lora-3 registered")
        assert "lora-3" in r.state.registry
        assert await call(http, "DELETE", r.url + "/adapters/lora-3") == (
            200,
            None,
            b"Adapter lora-3 unregistered",
        )
        status, _, _ = await call(http, "DELETE", r.url + "/adapters/lora-3")
        assert status == 404


COMPLETION_KEYS = [
    "id",
    "object",
    "created",
    "model",
    "choices",
    "service_tier",
    "system_fingerprint",
    "usage",
    "kv_transfer_params",
    "ec_transfer_params",
    "metrics",
]
CHAT_KEYS = [
    "id",
    "object",
    "created",
    "model",
    "choices",
    "service_tier",
    "system_fingerprint",
    "usage",
    "prompt_logprobs",
    "prompt_token_ids",
    "prompt_text",
    "kv_transfer_params",
    "ec_transfer_params",
    "metrics",
]


async def test_completion_and_chat_bodies(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    async with start_replica(lora_modules=()) as r:
        for name in ("lora-0", "lora-1"):
            await call(
                http,
                "POST",
                r.url + "/v1/load_lora_adapter",
                {"lora_name": name, "lora_path": adapter_dir(name, 16)},
            )
        prompt = "Hello world the adapter"
        body = {
            "model": "lora-0",
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
        }
        status, ctype, raw = await call(http, "POST", r.url + "/v1/completions", body)
        assert (status, ctype) == (200, "application/json")
        out = json.loads(raw)
        assert list(out) == COMPLETION_KEYS
        assert re.fullmatch(r"cmpl-[0-9a-f]{16}", out["id"])
        assert (out["object"], out["model"]) == ("text_completion", "lora-0")
        assert out["system_fingerprint"] == "vllm-0.32.0-3216f9d5"
        choice = out["choices"][0]
        assert list(choice) == [
            "index",
            "text",
            "logprobs",
            "finish_reason",
            "stop_reason",
            "token_ids",
            "prompt_logprobs",
            "prompt_token_ids",
            "routed_experts",
        ]
        assert choice["finish_reason"] == "length" and choice["text"]
        n_prompt = completion_prompt_tokens(prompt)
        assert out["usage"] == {
            "prompt_tokens": n_prompt,
            "total_tokens": n_prompt + 8,
            "completion_tokens": 8,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        }
        # The base model answers the same greedy prompt with another text.
        base = json.loads(
            (await call(http, "POST", r.url + "/v1/completions", {**body, "model": BASE}))[2]
        )
        assert base["choices"][0]["text"] != choice["text"]
        # No model field: the base model.
        no_model = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True}
        out = json.loads((await call(http, "POST", r.url + "/v1/completions", no_model))[2])
        assert out["model"] == BASE and out["usage"]["completion_tokens"] == 4

        chat = {
            "model": "lora-1",
            "messages": [{"role": "user", "content": "hello model"}],
            "max_tokens": 8,
            "ignore_eos": True,
        }
        status, ctype, raw = await call(http, "POST", r.url + "/v1/chat/completions", chat)
        out = json.loads(raw)
        assert (status, ctype, list(out)) == (200, "application/json", CHAT_KEYS)
        assert re.fullmatch(r"chatcmpl-[0-9a-f]{16}", out["id"])
        assert out["object"] == "chat.completion"
        message = out["choices"][0]["message"]
        assert list(message) == [
            "role",
            "content",
            "refusal",
            "annotations",
            "audio",
            "function_call",
            "reasoning",
        ]
        assert message["role"] == "assistant"
        assert out["usage"]["completion_tokens"] == 8
        assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 8


async def test_unknown_model_is_404_even_when_streaming(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    expected = {
        "message": "The model `no-such-adapter` does not exist. Valid aliases: tiny-llama.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    async with start_replica() as r:
        for path, body in [
            ("/v1/completions", {"model": "no-such-adapter", "prompt": "hi", "max_tokens": 4}),
            (
                "/v1/completions",
                {"model": "no-such-adapter", "prompt": "hi", "max_tokens": 4, "stream": True},
            ),
            (
                "/v1/chat/completions",
                {"model": "no-such-adapter", "messages": [{"role": "user", "content": "hi"}]},
            ),
        ]:
            status, ctype, raw = await call(http, "POST", r.url + path, body)
            assert (status, ctype) == (404, "application/json")
            assert error_of(raw) == expected


async def test_bad_requests(start_replica: StartReplica, http: aiohttp.ClientSession) -> None:
    async with start_replica() as r:
        status, ctype, raw = await call(http, "POST", r.url + "/v1/completions", raw=b'{"prompt": ')
        assert (status, ctype) == (400, "application/json")
        assert "json_invalid" in error_of(raw)["message"]
        too_long = {"prompt": "hi", "max_tokens": 600}
        status, _, raw = await call(http, "POST", r.url + "/v1/completions", too_long)
        assert status == 400
        err = error_of(raw)
        assert err["type"] == "BadRequestError" and err["message"].startswith(
            "max_tokens=600 cannot be greater than max_model_len=512."
        )
        status, _, raw = await call(
            http, "POST", r.url + "/v1/chat/completions", {"messages": "hi"}
        )
        assert status == 400 and error_of(raw)["param"] == "body.messages"
        status, _, raw = await call(http, "GET", r.url + "/v1/nothing-here")
        assert (status, json.loads(raw)) == (404, {"detail": "Not Found"})


async def test_n_is_checked_once_the_model_is_known(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    # vLLM 0.32 checks n in SamplingParams, after the model lookup and the renderer's checks.
    async with start_replica() as r:
        body = {"model": "nope", "prompt": "hi", "n": 0}
        status, _, raw = await call(http, "POST", r.url + "/v1/completions", body)
        assert status == 404 and error_of(raw)["type"] == "NotFoundError"
        status, _, raw = await call(
            http, "POST", r.url + "/v1/completions", {**body, "model": BASE}
        )
        assert status == 400
        assert error_of(raw) == {
            "message": "n must be at least 1, got 0.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }


async def test_prompt_embeds_are_refused_once_the_model_is_known(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    # vLLM 0.32's renderer refuses them, after the model lookup (not started with
    # --enable-prompt-embeds).
    async with start_replica() as r:
        body = {"model": "nope", "prompt_embeds": "AAAA"}
        status, _, raw = await call(http, "POST", r.url + "/v1/completions", body)
        assert status == 404 and error_of(raw)["type"] == "NotFoundError"
        body["model"] = BASE
        status, _, raw = await call(http, "POST", r.url + "/v1/completions", body)
        assert (status, error_of(raw)["param"]) == (400, "prompt_embeds")


UNSUPPORTED = {
    "message": "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
    "type": "Bad Request",
    "param": None,
    "code": 400,
}


PARSE_ERROR = "There was an error parsing the body"
JSON_INVALID = "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.1'"


async def test_json_endpoints_take_only_a_json_content_type(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    # vLLM 0.32's validate_json_request: the media type must be application/json (any case),
    # checked ahead of the body (even one that is no JSON), except that FastAPI decodes a body
    # of an application/...json or +json type first (its JSON errors come first).
    async with start_replica() as r:
        path = adapter_dir("a")
        bodies = {
            "/v1/completions": {"prompt": "hi", "max_tokens": 1},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
            "/v1/load_lora_adapter": {"lora_name": "a", "lora_path": path},
            "/v1/unload_lora_adapter": {"lora_name": "a"},
        }
        for endpoint, body in bodies.items():
            for ctype in (
                "text/plain", "application/json-seq", "application/json ; x=y",
                "application/vnd.api+json", None,
            ):  # fmt: skip
                headers = {"Content-Type": ctype} if ctype else {}
                skip = () if ctype else ("Content-Type",)
                decoded = ctype in ("application/json ; x=y", "application/vnd.api+json")
                for raw in (json.dumps(body).encode(), b"{not json", b"\xff"):
                    async with http.post(
                        r.url + endpoint, data=raw, headers=headers, skip_auto_headers=skip
                    ) as resp:
                        assert resp.status == 400, (endpoint, ctype)
                        answer = json.loads(await resp.read())
                    if not decoded or raw.startswith(b'{"'):
                        assert answer == {"error": UNSUPPORTED}, (endpoint, ctype, raw)
                    elif raw == b"\xff":  # not UTF-8: FastAPI's HTTPException, its shape
                        assert answer == {"detail": PARSE_ERROR}
                    else:
                        message = answer["error"]["message"]
                        assert message.startswith(JSON_INVALID), (endpoint, ctype)
            headers = {"Content-Type": "Application/JSON; charset=utf-8"}
            async with http.post(r.url + endpoint, data=json.dumps(body), headers=headers) as resp:
                assert resp.status == 200, (endpoint, await resp.text())


async def test_default_max_tokens_is_16_for_completions_and_the_context_for_chat(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    # vLLM 0.32: CompletionRequest.max_tokens defaults to 16 (a null too); chat has no default.
    async with start_replica(max_model_len=64, time_scale=50.0) as r:
        for extra in ({}, {"max_tokens": None}):
            body = {"prompt": "hello", "ignore_eos": True, **extra}
            out = json.loads((await call(http, "POST", r.url + "/v1/completions", body))[2])
            assert out["usage"]["completion_tokens"] == 16
            assert out["choices"][0]["finish_reason"] == "length"
        body = {"messages": [{"role": "user", "content": "hello"}], "ignore_eos": True}
        out = json.loads((await call(http, "POST", r.url + "/v1/chat/completions", body))[2])
        assert out["usage"]["total_tokens"] == 64
        assert out["choices"][0]["finish_reason"] == "length"


async def test_eos_sampling_stops_early_and_is_seeded(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    async def lengths(seed: int) -> list[tuple[int, str]]:
        async with start_replica(seed=seed, mean_output_tokens=4.0, time_scale=50.0) as r:
            out = []
            for _ in range(6):
                body = {"prompt": "hello", "max_tokens": 40, "temperature": 0.8}
                res = json.loads((await call(http, "POST", r.url + "/v1/completions", body))[2])
                out.append((res["usage"]["completion_tokens"], res["choices"][0]["finish_reason"]))
            return out

    first = await lengths(5)
    assert any(reason == "stop" and n < 40 for n, reason in first)
    assert first == await lengths(5)


async def test_metrics_after_sequential_adapter_requests_like_the_recording(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    async with start_replica() as r:
        status, ctype, raw = await call(http, "GET", r.url + "/metrics")
        assert (status, ctype) == (200, "text/plain; version=1.0.0; charset=utf-8")
        assert "vllm:lora_requests_info{" not in raw.decode()  # nothing seen before a step
        for name in ("lora-0", "lora-1"):
            await call(
                http,
                "POST",
                r.url + "/v1/load_lora_adapter",
                {"lora_name": name, "lora_path": adapter_dir(name)},
            )
            body = {"model": name, "prompt": "hi", "max_tokens": 4, "ignore_eos": True}
            assert (await call(http, "POST", r.url + "/v1/completions", body))[0] == 200
        text = (await call(http, "GET", r.url + "/metrics"))[2].decode()
    lines = text.splitlines()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:num_requests_waiting_by_reason",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
    ):
        assert f"# TYPE {name} gauge" in lines
        assert any(line.startswith(f"# HELP {name} ") for line in lines)
    assert 'vllm:num_preemptions_total{engine="0",model_name="tiny-llama"} 0.0' in lines
    series = re.findall(
        r'^vllm:lora_requests_info\{max_lora="2",running_lora_adapters="([^"]*)",'
        r'waiting_lora_adapters="\1"\} (\d\.\d+e\+09)$',
        text,
        flags=re.MULTILINE,
    )
    assert [s[0] for s in series] == ["lora-0", "", "lora-1"]
    newest = max(series, key=lambda s: float(s[1]))
    assert newest[0] == ""  # idle now: the empty combination was seen last


async def test_a_json_body_that_cannot_be_decoded(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    # FastAPI's HTTPException(400) when json.loads fails other than with a JSONDecodeError,
    # in FastAPI's shape (compared with real vLLM in tests/e2e/test_vllm_parity.py).
    bodies = [b"\xff", b"[" * 100_000, b'{"prompt": ' + b"9" * 5000 + b"}"]
    async with start_replica() as r:
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"):
            for raw in bodies:
                headers = {"Content-Type": "application/json"}
                async with http.post(r.url + path, data=raw, headers=headers) as resp:
                    assert resp.status == 400, (path, raw[:10])
                    assert await resp.json() == {"detail": PARSE_ERROR}, (path, raw[:10])
