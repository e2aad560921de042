"""Prompts on real vLLM 0.32 (CPU, the bundled tiny-llama), on our simulated replica and through
the gateway: the same requests, the same answers.

What real vLLM 0.32.0 answered (max_model_len 512; run on 2026-11-28):

* A completions body without a prompt (``{}``, ``prompt`` null or ``""``, ``prompt_embeds``
  ``[]``), whatever else it holds (an unknown or mistyped ``model``, a bad ``max_tokens``): 400
  ``{"message": "Either prompt or prompt_embeds must be provided and non-empty.
  (parameter=prompt)", "type": "BadRequestError", "param": "prompt", "code": 400}``. It is
  ``CompletionRequest.validate_prompt_and_prompt_embeds`` (``entrypoints/openai/completion/
  protocol.py:591-610``), a ``mode="before"`` model validator raising ``VLLMValidationError``
  (``exceptions.py:28``), which is no ``ValueError``: pydantic lets it through, and vLLM's
  ``VLLMError`` handler answers it (``serve/exception_handling/error_response.py``:
  ``BadRequestError``, ``param`` = the error's ``parameter``).
* ``prompt: []``: 400 ``You must pass at least one prompt`` (``renderers/base.py:523``, a
  ``ValueError``: ``param`` null); ``[""]`` and ``[[]]``: 400 ``The decoder prompt cannot be
  empty`` (``v1/engine/input_processor.py:566``); ``prompt_embeds`` without
  ``--enable-prompt-embeds``: 400 naming it (``renderers/embed_utils.py:45``). Chat without
  messages: 400 ``Cannot apply chat template to an empty conversation. Provide at least one
  message.`` (transformers 5.19's ``apply_chat_template``, a ``ValueError``).
* vLLM's other "before" validators answer ahead of the model lookup and of every field's type
  too (same day): a list of 1025 prompts (texts, or token-id lists) is 400 ``prompt list
  length 1025 exceeds the maximum allowed count of 1024. To increase this limit, set the
  VLLM_MAX_COMPLETION_PROMPTS environment variable. (parameter=prompt)``, ``param`` "prompt"
  (``validate_prompt_list_length``); ``stream_options`` without ``stream`` is ``Stream options
  can only be defined when `stream=True`. (parameter=stream_options)``, ``param``
  "stream_options", even with a mistyped ``max_tokens``; a chat whose ``messages`` is null is
  ``'NoneType' object is not iterable``, ``param`` null. ``n`` 0 and 16385 are
  ``SamplingParams``' ``n must be at least 1, got 0.`` and ``n must be at most 16384, got
  16385. To increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable.``.
* ``prompt_embeds`` are refused by the renderer, once the fields are valid and the model known
  (an unknown model: 404; a mistyped ``max_tokens``: its validation error), with a ``prompt``
  beside them too; with ``echo``: ``Echo is unsupported with prompt embeds.``, ``param`` null.
* ``usage.prompt_tokens``: the tiny model's tokenizer adds no BOS (its ``tokenizer.json``
  post-processor adds no special token), so "Hello world the adapter" is 4 tokens, with or
  without ``add_special_tokens``; a chat is the template ``<|role|>content</s>`` per message
  plus ``<|assistant|>``: ``[user "hi"]`` is 4 tokens, 3 without the generation prompt.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest
from vllm_e2e import BASE, REAL_CONFIG

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from vllm_cpu.replica import Replica

pytestmark = pytest.mark.vllm

_NO_PROMPT = "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"
_EMPTY = "The decoder prompt cannot be empty"
_NO_EMBEDS = (
    "You must set `--enable-prompt-embeds` to input `prompt_embeds`. (parameter=prompt_embeds)"
)
_TOO_MANY = (
    "prompt list length 1025 exceeds the maximum allowed count of 1024. To increase this "
    "limit, set the VLLM_MAX_COMPLETION_PROMPTS environment variable. (parameter=prompt)"
)
_STREAM_OPTIONS = (
    "Stream options can only be defined when `stream=True`. (parameter=stream_options)"
)
# (body, message, param): every answer is a 400 BadRequestError with code 400.
REFUSALS: list[tuple[dict[str, Any], str, str | None]] = [
    ({}, _NO_PROMPT, "prompt"),
    ({"model": BASE}, _NO_PROMPT, "prompt"),
    ({"model": BASE, "prompt": None}, _NO_PROMPT, "prompt"),
    ({"model": BASE, "prompt": ""}, _NO_PROMPT, "prompt"),
    ({"model": BASE, "prompt_embeds": []}, _NO_PROMPT, "prompt"),
    ({"model": BASE, "prompt": None, "prompt_embeds": None}, _NO_PROMPT, "prompt"),
    ({"model": "no-such-model"}, _NO_PROMPT, "prompt"),
    ({"model": 5, "max_tokens": "abc"}, _NO_PROMPT, "prompt"),
    ({"model": BASE, "prompt": []}, "You must pass at least one prompt", None),
    ({"model": BASE, "prompt": [""]}, _EMPTY, None),
    ({"model": BASE, "prompt": [[]]}, _EMPTY, None),
    ({"model": BASE, "prompt": ["hi", ""]}, _EMPTY, None),
    ({"model": BASE, "prompt_embeds": "AAAA"}, _NO_EMBEDS, "prompt_embeds"),
    ({"model": BASE, "prompt": "x", "prompt_embeds": "AAAA"}, _NO_EMBEDS, "prompt_embeds"),
    (
        {"model": BASE, "prompt_embeds": "AAAA", "echo": True},
        "Echo is unsupported with prompt embeds.",
        None,
    ),
    # Every prompt is rendered before any gets its sampling parameters, and those come before
    # the engine takes any: a later prompt's earlier-step error is the answer.
    (
        {"model": BASE, "prompt": [[1, 2], [1] * 600], "min_tokens": -1},
        "This model's maximum context length is 512 tokens. However, your prompt contains 600 "
        "input tokens, which exceeds this limit even without any output tokens. Please reduce "
        "the length of the input prompt. (parameter=input_tokens, value=600)",
        "input_tokens",
    ),
    (
        {"model": BASE, "prompt": [[], [1] * 512], "max_tokens": 1},
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        "max_tokens",
    ),
    # vLLM's "before" validators, ahead of the model lookup and of every field's type.
    ({"model": BASE, "prompt": ["x"] * 1025}, _TOO_MANY, "prompt"),
    (
        {"model": "no-such-model", "prompt": [[1, 2]] * 1025, "max_tokens": "abc"},
        _TOO_MANY,
        "prompt",
    ),
    (
        {"model": BASE, "prompt": "x", "stream_options": {"include_usage": True}},
        _STREAM_OPTIONS,
        "stream_options",
    ),
    (
        {
            "model": BASE,
            "prompt": "x",
            "stream_options": {"include_usage": True},
            "max_tokens": "abc",
        },
        _STREAM_OPTIONS,
        "stream_options",
    ),
    # The logprobs fields' "before" checks (after stream_options' on completions).
    (
        {"model": BASE, "prompt": "x", "logprobs": -2, "max_tokens": "abc"},
        "`logprobs` must be a positive value or -1. (parameter=logprobs, value=-2)",
        "logprobs",
    ),
    (
        {"model": BASE, "prompt": "x", "logprobs": "3"},
        "`logprobs` must be an integer. (parameter=logprobs, value=3)",
        "logprobs",
    ),
    (
        {"model": BASE, "prompt": "x", "prompt_logprobs": 1, "stream": True},
        "`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)",
        "prompt_logprobs",
    ),
    # SamplingParams' n, once the model is known.
    ({"model": BASE, "prompt": "x", "n": 0}, "n must be at least 1, got 0.", None),
    (
        {"model": BASE, "prompt": "x", "n": 16385},
        "n must be at most 16384, got 16385. To "
        "increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable.",
        None,
    ),
]
# The same for chat: no messages (transformers' apply_chat_template refuses them).
_NO_MESSAGES = "Cannot apply chat template to an empty conversation. Provide at least one message."
CHAT_REFUSALS: list[tuple[dict[str, Any], str, str | None]] = [
    ({"model": BASE, "messages": []}, _NO_MESSAGES, None),
    ({"model": BASE, "messages": [], "add_generation_prompt": False}, _NO_MESSAGES, None),
    (
        {"model": BASE, "messages": None, "max_tokens": "abc"},
        "'NoneType' object is not iterable",
        None,
    ),
    (
        {
            "model": BASE,
            "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": True},
            "max_tokens": "abc",
        },
        _STREAM_OPTIONS,
        "stream_options",
    ),
    # Chat checks the logprobs fields before stream_options.
    (
        {
            "model": BASE,
            "messages": [{"role": "user", "content": "hi"}],
            "top_logprobs": 2,
            "stream_options": {"include_usage": True},
        },
        "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)",
        "top_logprobs",
    ),
    (
        {
            "model": BASE,
            "messages": [{"role": "user", "content": "hi"}],
            "continue_final_message": True,
            "add_generation_prompt": True,
            "max_tokens": "abc",
        },
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        None,
    ),
]

# (prompt, extra body, usage.prompt_tokens on real vLLM)
COMPLETIONS: list[tuple[str, dict[str, Any], int]] = [
    ("Hello world the adapter", {}, 4),
    ("Hello world the adapter", {"add_special_tokens": False}, 4),
    ("Hello world the adapter", {"add_special_tokens": True}, 4),
    ("hi", {}, 1),
    ("Hello, world!", {}, 4),
    ("What is the answer?", {}, 5),
    ("Hello world, this is the gateway", {}, 7),
]
_HI = [{"role": "user", "content": "hi"}]
_TURNS = [
    {"role": "user", "content": "Hello world"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "What is the answer?"},
]
CHATS: list[tuple[list[dict[str, str]], dict[str, Any], int]] = [
    (_HI, {}, 4),
    (_HI, {"add_generation_prompt": False}, 3),
    (_HI, {"add_special_tokens": True}, 4),
    ([{"role": "user", "content": "Hello world the adapter"}], {}, 7),
    ([{"role": "user", "content": ""}], {}, 3),
    (_TURNS, {}, 16),
    (_TURNS, {"add_generation_prompt": False}, 15),
]


def _twin_config(real: Replica) -> ReplicaConfig:
    c = REAL_CONFIG
    return ReplicaConfig(
        model=str(real.model_dir),
        served_model_name=BASE,
        enable_lora=True,
        max_loras=c.max_loras,
        max_cpu_loras=c.max_cpu_loras,
        max_lora_rank=c.max_lora_rank,
        max_num_seqs=c.max_num_seqs,
        max_num_batched_tokens=c.max_num_batched_tokens,
        max_model_len=c.max_model_len,
        profile="fast",
        time_scale=10.0,
    )


async def test_prompt_refusals_on_real_vllm_the_twin_and_the_gateway(
    real_vllm: Replica, http: aiohttp.ClientSession
) -> None:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": "real0", "url": real_vllm.base_url}],
    }
    problems: list[str] = []
    async with (
        run_replica(_twin_config(real_vllm), host="127.0.0.1", port=0) as twin,
        running_gateway(config_from_mapping(doc), port=0) as gw,
    ):
        servers = [("real", real_vllm.base_url), ("twin", twin.url), ("gateway", gw.url)]
        for name, base in servers:
            cases = [("/v1/completions", *c) for c in REFUSALS]
            cases += [("/v1/chat/completions", *c) for c in CHAT_REFUSALS]
            for path, body, message, param in cases:
                async with http.post(base + path, json=body) as r:
                    status, answer = r.status, await r.json()
                err = answer.get("error", {}) if isinstance(answer, dict) else {}
                seen = (
                    status,
                    err.get("type"),
                    err.get("code"),
                    err.get("param"),
                    err.get("message"),
                )
                want = (400, "BadRequestError", 400, param, message)
                if seen != want:
                    shown = str(body) if len(str(body)) < 200 else str(body)[:200] + "...}"
                    problems.append(f"{name} {shown}:\n  got  {seen}\n  want {want}")
    assert not problems, "prompt refusals differ from vLLM 0.32:\n" + "\n".join(problems)


async def test_prompt_tokens_on_real_vllm_and_the_twin(real_vllm: Replica) -> None:
    problems: list[str] = []
    async with run_replica(_twin_config(real_vllm), host="127.0.0.1", port=0) as twin:
        for name, base in (("real", real_vllm.base_url), ("twin", twin.url)):
            async with openai.AsyncOpenAI(
                base_url=base + "/v1", api_key="x", max_retries=0, timeout=120
            ) as client:
                for prompt, extra, tokens in COMPLETIONS:
                    out = await client.completions.create(
                        model=BASE, prompt=prompt, max_tokens=1, extra_body=extra
                    )
                    seen = out.usage.prompt_tokens if out.usage else None
                    if seen != tokens:
                        problems.append(
                            f"{name} completion {prompt!r} {extra}: {seen} tokens, vLLM {tokens}"
                        )
                for messages, extra, tokens in CHATS:
                    chat = await client.chat.completions.create(
                        model=BASE,
                        messages=messages,
                        max_tokens=1,  # type: ignore[arg-type]
                        extra_body=extra,
                    )
                    seen = chat.usage.prompt_tokens if chat.usage else None
                    if seen != tokens:
                        problems.append(
                            f"{name} chat {messages} {extra}: {seen} tokens, vLLM {tokens}"
                        )
    assert not problems, "prompt tokens differ from vLLM 0.32:\n" + "\n".join(problems)


async def test_checks_made_once_the_fields_are_valid_and_the_model_known(
    real_vllm: Replica, http: aiohttp.ClientSession
) -> None:
    """``n`` and ``max_tokens`` below 1 are SamplingParams' checks and ``prompt_embeds`` the
    renderer's: an unknown model is vLLM's 404 first (and a mistyped field its validation
    error), a prompt longer than the context the renderer's 400; with ``max_tokens: 0`` the
    ``n`` error comes before ``max_tokens``'. The gateway in front of vLLM answers the same,
    the whole error object (its own 404 for an unknown model included): it refuses
    ``max_tokens: 0`` itself only where no earlier check can fire."""
    cases: list[tuple[dict[str, Any], int, str]] = [
        (
            {"model": "no-such-model", "prompt": "x", "n": 0},
            404,
            "The model `no-such-model` does not exist. Valid aliases: tiny-llama.",
        ),
        (
            {"model": BASE, "prompt": "x", "n": 0, "max_tokens": 0},
            400,
            "n must be at least 1, got 0.",
        ),
        (
            {"model": BASE, "prompt": [1] * 600, "max_tokens": 0},
            400,
            "This model's maximum context length is 512 tokens. However, your prompt contains 600 "
            "input tokens, which exceeds this limit even without any output tokens. Please reduce "
            "the length of the input prompt. (parameter=input_tokens, value=600)",
        ),
        (
            {"model": BASE, "prompt": "x " * 600, "max_tokens": 0},
            400,
            "This model's maximum context length is 512 tokens. However, your prompt contains at "
            "least 513 input tokens, which exceeds this limit even without any output tokens. "
            "Please reduce the length of the input prompt. (parameter=input_tokens, value=513)",
        ),
        (
            {"model": BASE, "prompt": "x", "max_tokens": 0},
            400,
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        ),
        (
            {"model": BASE, "prompt": [1, 2], "max_tokens": -1, "stream": True},
            400,
            "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)",
        ),
        # SamplingParams' ranges: after n, before max_tokens (the twin uses none of these).
        (
            {"model": BASE, "prompt": "x", "max_tokens": 0, "top_p": 0},
            400,
            "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)",
        ),
        (
            {"model": BASE, "prompt": "x", "n": 0, "temperature": -1},
            400,
            "n must be at least 1, got 0.",
        ),
        (
            {"model": BASE, "prompt": "x", "temperature": -1, "presence_penalty": 2.5},
            400,
            "presence_penalty must be in [-2, 2], got 2.5.",
        ),
        (
            {"model": BASE, "prompt": "x", "frequency_penalty": -3},
            400,
            "frequency_penalty must be in [-2, 2], got -3.0.",
        ),
        (
            {"model": BASE, "prompt": "x", "repetition_penalty": 0},
            400,
            "repetition_penalty must be greater than zero, got 0.0.",
        ),
        (
            {"model": BASE, "prompt": "x", "temperature": 2.5},
            400,
            "temperature must be in [0, 2], got 2.5. (parameter=temperature, value=2.5)",
        ),
        (
            {"model": BASE, "prompt": "x", "temperature": float("nan")},
            400,
            "temperature must be a finite number, got nan. (parameter=temperature, value=nan)",
        ),
        (
            {"model": BASE, "prompt": "x", "top_k": -2, "min_p": 1.5},
            400,
            "top_k must be 0 (disable), or at least 1, got -2.",
        ),
        (
            {"model": BASE, "prompt": "x", "min_p": 1.5, "max_tokens": 0},
            400,
            "min_p must be in [0, 1], got 1.5.",
        ),
        (
            {
                "model": BASE,
                "prompt": "x",
                "top_p": "abc",
                "stream": True,
                "stream_options": {"continuous_usage_stats": "maybe"},
            },
            400,
            "2 validation errors:\n  {'type': 'bool_parsing', 'loc': "
            "'body.stream_options.continuous_usage_stats', 'msg': 'Input should be a valid "
            "boolean, unable to interpret input', 'input': 'maybe'}\n  {'type': 'float_parsing', "
            "'loc': 'body.top_p', 'msg': 'Input should be a valid number, unable to parse string "
            "as a number', 'input': 'abc'}",
        ),
        (
            {"model": "no-such-model", "prompt_embeds": "AAAA"},
            404,
            "The model `no-such-model` does not exist. Valid aliases: tiny-llama.",
        ),
        (
            {"model": BASE, "prompt_embeds": "AAAA", "max_tokens": "abc"},
            400,
            "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': "
            "'Input should be a valid integer, unable to parse string as an integer', 'input': "
            "'abc'}",
        ),
    ]
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": "real0", "url": real_vllm.base_url}],
    }
    problems: list[str] = []
    async with (
        run_replica(_twin_config(real_vllm), host="127.0.0.1", port=0) as twin,
        running_gateway(config_from_mapping(doc), port=0) as gw,
    ):
        servers = (("real", real_vllm.base_url), ("twin", twin.url), ("gateway", gw.url))
        errors: dict[str, list[dict[str, Any]]] = {}
        for name, base in servers:
            for body, status, message in cases:
                async with http.post(base + "/v1/completions", json=body) as r:
                    error = (await r.json())["error"]
                    seen = (r.status, error["message"])
                errors.setdefault(name, []).append(error)
                if seen != (status, message):
                    shown = str(body) if len(str(body)) < 200 else str(body)[:200] + "...}"
                    problems.append(f"{name} {shown}: got {seen}, want {(status, message)}")
    # The gateway answers an unknown model itself, with vLLM's whole error: type NotFoundError,
    # param model, code 404 (35f8b0a); the other errors are vLLM's own, passed through.
    for (body, _, _), real_error, gateway_error in zip(
        cases, errors["real"], errors["gateway"], strict=True
    ):
        if gateway_error != real_error:
            problems.append(f"gateway {body}: error {gateway_error}, vLLM {real_error}")
    assert not problems, "answers differ from vLLM 0.32:\n" + "\n".join(problems)


async def test_json_endpoints_refuse_another_content_type(
    real_vllm: Replica, http: aiohttp.ClientSession
) -> None:
    """vLLM's ``validate_json_request``: completions, chat and the adapter admin calls take
    only ``application/json``, checked ahead of the body, except that FastAPI decodes a body of
    an ``application/...json`` or ``+json`` type first (its JSON errors come first). The
    gateway, which sends every body upstream as JSON, answers completions and chat the same."""
    want = (400, {"error": {
        "message": "1 validation error:\n  Unsupported Media Type: Only 'application/json' is "
                   "allowed",
        "type": "Bad Request", "param": None, "code": 400}})  # fmt: skip
    bodies = {
        "/v1/completions": {"model": BASE, "prompt": "hi", "max_tokens": 1},
        "/v1/chat/completions": {"model": BASE, "messages": [{"role": "user", "content": "hi"}]},
        "/v1/load_lora_adapter": {"lora_name": "ctype-x", "lora_path": "/nowhere"},
        "/v1/unload_lora_adapter": {"lora_name": "ctype-x"},
    }
    json_invalid = (400, {"error": {
        "message": "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.1', 'msg': "
                   "'JSON decode error', 'input': '<dict of 0 items>', 'ctx': {'error': "
                   "'Expecting property name enclosed in double quotes'}}",
        "type": "Bad Request", "param": "body.1", "code": 400}})  # fmt: skip
    # (Content-Type, whether the body is valid JSON, the answer)
    kinds = [("text/plain", True, want), (None, True, want), ("text/plain", False, want),
             ("application/vnd.api+json", True, want),
             ("application/vnd.api+json", False, json_invalid),
             ("application/json ; x=y", True, want), ("application/json ; x=y", False,
                                                      json_invalid)]  # fmt: skip
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": "real0", "url": real_vllm.base_url}],
    }
    problems: list[str] = []
    async with (
        run_replica(_twin_config(real_vllm), host="127.0.0.1", port=0) as twin,
        running_gateway(config_from_mapping(doc), port=0) as gw,
    ):
        servers = (("real", real_vllm.base_url), ("twin", twin.url), ("gateway", gw.url))
        for name, base in servers:
            for path, body in bodies.items():
                if name == "gateway" and "lora" in path:
                    continue  # (the gateway serves no adapter admin calls of vLLM's)
                for ctype, valid, answer in kinds:
                    headers = {"Content-Type": ctype} if ctype else {}
                    skip = () if ctype else ("Content-Type",)
                    data = json.dumps(body) if valid else "{not json"
                    async with http.post(
                        base + path, data=data, headers=headers, skip_auto_headers=skip
                    ) as r:
                        seen = (r.status, await r.json(content_type=None))
                    if seen != answer:
                        problems.append(f"{name} {path} {ctype} {data[:20]}: got {seen}")
    assert not problems, "answers differ from vLLM 0.32:\n" + "\n".join(problems)


async def test_json_bodies_that_cannot_be_decoded(
    real_vllm: Replica, http: aiohttp.ClientSession
) -> None:
    """FastAPI's ``HTTPException(400)`` "There was an error parsing the body" when ``json.loads``
    fails other than with a ``JSONDecodeError``: bytes that are no UTF-8, an integer of more
    than 4,300 digits, nesting deeper than the recursion limit. Real vLLM answers it in
    FastAPI's shape, ``{"detail": ...}``, and so does the twin; the gateway in its own."""
    bodies = [b"\xff", b"[" * 100_000, b'{"prompt": ' + b"9" * 5000 + b"}"]
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": "real0", "url": real_vllm.base_url}],
    }
    seen: dict[str, list[Any]] = {}
    async with (
        run_replica(_twin_config(real_vllm), host="127.0.0.1", port=0) as twin,
        running_gateway(config_from_mapping(doc), port=0) as gw,
    ):
        for name, base in (("real", real_vllm.base_url), ("twin", twin.url), ("gateway", gw.url)):
            seen[name] = []
            for path in ("/v1/completions", "/v1/chat/completions"):
                for raw in bodies:
                    async with http.post(
                        base + path, data=raw, headers={"Content-Type": "application/json"}
                    ) as r:
                        seen[name].append(
                            (path, raw[:12], r.status, await r.json(content_type=None))
                        )
    assert seen["real"][0][2:] == (400, {"detail": "There was an error parsing the body"})
    assert seen["twin"] == seen["real"], seen
    # The gateway answers in the OpenAI shape it gives every error, with vLLM's words.
    assert [(p, raw, s, a["error"]["message"]) for p, raw, s, a in seen["gateway"]] == [
        (p, raw, s, a["detail"]) for p, raw, s, a in seen["real"]]  # fmt: skip


async def test_adapter_admin_bodies(real_vllm: Replica, http: aiohttp.ClientSession) -> None:
    """The load/unload bodies' fields are read in pydantic's lax mode (``load_inplace: "yes"``
    is true) and every bad one is listed, as vLLM 0.32 reads them. None of these bodies changes
    the replica: a valid one names no adapter folder or no registered adapter."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("load", {"lora_name": "pb-a", "lora_path": "/nowhere", "load_inplace": "yes"}),
        ("load", {"lora_name": "pb-a", "lora_path": "/nowhere", "load_inplace": None}),
        ("load", {"lora_name": 5, "load_inplace": 2, "is_3d_lora_weight": "maybe"}),
        ("load", {"lora_name": None, "lora_path": None}),
        ("unload", {"lora_name": "pb-a", "lora_int_id": "x"}),
        ("unload", {"lora_int_id": "7"}),
    ]
    answers: dict[str, list[tuple[int, Any]]] = {}
    async with run_replica(_twin_config(real_vllm), host="127.0.0.1", port=0) as twin:
        for name, base in (("real", real_vllm.base_url), ("twin", twin.url)):
            answers[name] = []
            for call, body in cases:
                async with http.post(f"{base}/v1/{call}_lora_adapter", json=body) as r:
                    answers[name].append((r.status, await r.json(content_type=None)))
    problems = [f"{case}:\n  real {real}\n  twin {ours}"
                for case, real, ours in zip(cases, answers["real"], answers["twin"], strict=True)
                if real != ours]  # fmt: skip
    assert not problems, "answers differ from vLLM 0.32:\n" + "\n".join(problems)


async def test_prompt_lists_as_pydantics_union_reads_them(
    real_vllm: Replica, http: aiohttp.ClientSession
) -> None:
    """``prompt`` is ``list[int >= 0] | list[list[int >= 0]] | str | list[str]``: ``["5", 1]``
    is read as token ids in lax mode; a list fitting no member is every member's errors."""
    bodies: list[dict[str, Any]] = [
        {"model": BASE, "prompt": ["5", 1], "max_tokens": 1},
        {"model": BASE, "prompt": [[1.0, 2], [True]], "max_tokens": 1},
        {"model": BASE, "prompt": ["a", 1]},
        {"model": BASE, "prompt": [[1], [-2, "b"]], "max_tokens": "x"},
        {"model": BASE, "prompt": ["x", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]},
    ]
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": "real0", "url": real_vllm.base_url}],
    }
    seen: dict[str, list[Any]] = {}
    async with (
        run_replica(_twin_config(real_vllm), host="127.0.0.1", port=0) as twin,
        running_gateway(config_from_mapping(doc), port=0) as gw,
    ):
        for name, base in (("real", real_vllm.base_url), ("twin", twin.url), ("gateway", gw.url)):
            seen[name] = []
            for body in bodies:
                async with http.post(base + "/v1/completions", json=body) as r:
                    answer = await r.json()
                kept = answer["usage"]["prompt_tokens"] if r.status == 200 else answer["error"]
                seen[name].append((r.status, kept))
    problems = [f"{name} {body}:\n  got  {got}\n  real {real}"
                for name in ("twin", "gateway")
                for body, got, real in zip(bodies, seen[name], seen["real"], strict=True)
                if got != real]  # fmt: skip
    assert not problems, "answers differ from vLLM 0.32:\n" + "\n".join(problems)
