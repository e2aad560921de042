"""The simulated replica's ``POST /tokenize`` and ``POST /detokenize`` against real vLLM 0.32's
answers (``bench/vllm_cpu/tokenize_transcript.md``): the shapes, the model check (an adapter
tokenizes as the base model; an unknown one is vLLM's 404; one the resolver finds is registered)
and the refusals, byte for byte. The ids are the synthetic tokenizer's; the count is what
``usage.prompt_tokens`` says of the same prompt."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loragate.twin.server import RunningReplica

MakeAdapterDir = Callable[..., str]
StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]
BASE = "tiny-llama"
MODEL_PATH = "/models/tiny-llama"  # (the fixture's --model)


async def post(
    http: aiohttp.ClientSession, url: str, body: Any = None, *, raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:  # fmt: skip
    data = raw if raw is not None else json.dumps(body).encode()
    async with http.post(url, data=data, headers={"Content-Type": content_type}) as resp:
        return resp.status, json.loads(await resp.read())


def _errors(*lines: str) -> str:
    label = "error" if len(lines) == 1 else "errors"
    return f"{len(lines)} validation {label}:\n" + "\n".join(f"  {line}" for line in lines)


_MODEL_5 = "{'type': 'string_type', 'loc': 'body.model', 'msg': 'Input should be a valid string', 'input': '5'}"  # noqa: E501
_NOT_OBJECT = "{'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should be a valid dictionary or object to extract fields from', 'input': '<list of 1 items>'}"  # noqa: E501

# (path, body or raw bytes, status, message, param): real vLLM 0.32's answers, recorded.
REFUSALS = [
    ("/tokenize", {"model": 5, "prompt": "x"}, 400, _errors(
        _MODEL_5, _MODEL_5,
        "{'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 2 items>'}",  # noqa: E501
    ), "body.model"),
    ("/tokenize", {"prompt": 5}, 400, _errors(
        "{'type': 'string_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid string', 'input': '5'}",  # noqa: E501
        "{'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 1 items>'}",  # noqa: E501
    ), "body.prompt"),
    ("/tokenize", {"model": BASE}, 400, _errors(
        "{'type': 'missing', 'loc': 'body.prompt', 'msg': 'Field required', 'input': '<dict of 1 items>'}",  # noqa: E501
        "{'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 1 items>'}",  # noqa: E501
    ), "body.prompt"),
    ("/tokenize", b"[1]", 400, _errors(_NOT_OBJECT, _NOT_OBJECT), "body"),
    ("/tokenize", b"", 400, _errors(
        "{'type': 'missing', 'loc': 'body', 'msg': 'Field required', 'input': 'None'}"
    ), "body"),
    ("/tokenize", b"{nope", 400, _errors(
        "{'type': 'json_invalid', 'loc': 'body.1', 'msg': 'JSON decode error', 'input': '<dict of 0 items>', 'ctx': {'error': 'Expecting property name enclosed in double quotes'}}"  # noqa: E501
    ), "body.1"),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404,
     "The model `nope` does not exist. Valid aliases: tiny-llama.", "model"),
    ("/detokenize", {"tokens": [-1]}, 400, _errors(
        "{'type': 'greater_than_equal', 'loc': 'body.tokens.0', 'msg': 'Input should be greater than or equal to 0', 'input': '-1', 'ctx': {'ge': 0}}"  # noqa: E501
    ), "body.tokens.0"),
    ("/detokenize", {"tokens": "abc"}, 400, _errors(
        "{'type': 'list_type', 'loc': 'body.tokens', 'msg': 'Input should be a valid list', 'input': 'abc'}"  # noqa: E501
    ), "body.tokens"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404,
     "The model `nope` does not exist. Valid aliases: tiny-llama.", "model"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "message", "param"), REFUSALS)
async def test_refusals_are_vllms(
    start_replica: StartReplica, http: aiohttp.ClientSession,
    path: str, body: Any, status: int, message: str, param: str,
) -> None:  # fmt: skip
    raw = body if isinstance(body, bytes) else None
    async with start_replica() as r:
        got = await post(http, r.url + path, None if raw is not None else body, raw=raw)
    err_type = "NotFoundError" if status == 404 else "Bad Request"
    assert got == (status, {"error": {"message": message, "type": err_type, "param": param,
                                      "code": status}})  # fmt: skip


async def test_a_body_that_is_not_json_typed_is_refused_as_vllm_does(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    async with start_replica() as r:
        got = await post(
            http, r.url + "/tokenize", raw=b'{"prompt": "x"}', content_type="text/plain"
        )
    message = "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"
    assert got == (400, {"error": {"message": message, "type": "Bad Request", "param": None,
                                   "code": 400}})  # fmt: skip


async def test_tokenize_counts_the_prompt_as_usage_does_and_an_adapter_as_the_base_model(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    prompt = "Hello world the adapter"
    async with start_replica() as r:
        load = {"lora_name": "tk-a", "lora_path": adapter_dir("a")}
        async with http.post(r.url + "/v1/load_lora_adapter", json=load) as resp:
            assert resp.status == 200
        answers = [
            await post(http, r.url + "/tokenize", {"model": model, "prompt": prompt})
            for model in (BASE, "tk-a", None)
        ]
        body = {"model": BASE, "prompt": prompt, "max_tokens": 1}
        async with http.post(r.url + "/v1/completions", json=body) as resp:
            usage = (await resp.json())["usage"]["prompt_tokens"]
        strs = await post(http, r.url + "/tokenize",
                          {"prompt": "Hello world", "return_token_strs": True})  # fmt: skip
    status, doc = answers[0]
    assert status == 200 and list(doc) == ["count", "max_model_len", "tokens", "token_strs"]
    assert doc["count"] == len(doc["tokens"]) == usage == 4
    assert doc["max_model_len"] == 512 and doc["token_strs"] is None
    assert answers[1] == answers[2] == answers[0]  # the adapter changes nothing, as in vLLM
    assert strs[1]["token_strs"] == ["Hello", "\u0120world"]


async def test_a_chat_is_counted_with_its_template_tokens_as_recorded(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    async with start_replica() as r:
        with_prompt = await post(http, r.url + "/tokenize", {"messages": messages})
        without = await post(
            http, r.url + "/tokenize", {"messages": messages, "add_generation_prompt": False}
        )
    # real vLLM: [5, 288, 2, 6] (<|user|> hi </s> <|assistant|>) and [5, 288, 2]
    tokens = with_prompt[1]["tokens"]
    assert with_prompt[0] == 200 and len(tokens) == 4
    assert (tokens[0], tokens[2], tokens[3]) == (5, 2, 6)
    assert without[1]["tokens"] == tokens[:3] and without[1]["count"] == 3


async def test_detokenize_reads_ids_as_the_echo_does_and_past_the_vocabulary_as_nothing(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    async with start_replica() as r:
        ids = (await post(http, r.url + "/tokenize", {"prompt": " the model"}))[1]["tokens"]
        back = await post(http, r.url + "/detokenize", {"model": BASE, "tokens": ids})
        past = await post(http, r.url + "/detokenize", {"tokens": [5000]})
    assert back == (200, {"prompt": " the model"})
    assert past == (200, {"prompt": ""})  # as real vLLM answered


async def test_an_adapter_the_resolver_finds_is_registered_by_a_tokenize_as_in_vllm(
    start_replica: StartReplica, http: aiohttp.ClientSession, tmp_path: Path,
    adapter_dir: MakeAdapterDir,
) -> None:  # fmt: skip
    adapter_dir("res-a", base_model_name_or_path=MODEL_PATH)
    async with start_replica(resolver_dir=str(tmp_path / "loras")) as r:
        status, _ = await post(http, r.url + "/tokenize", {"model": "res-a", "prompt": "hi"})
        async with http.get(r.url + "/v1/models") as resp:
            ids = [m["id"] for m in (await resp.json())["data"]]
    assert status == 200 and ids == [BASE, "res-a"]
