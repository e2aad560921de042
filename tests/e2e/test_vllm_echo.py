"""``echo`` on real vLLM 0.32 (CPU) and on our simulated replica: the same checks, run against
both, through the official openai SDK. Every failed check of both servers is listed at once.
The context-window limits (which an echo without generation meets at a full window) are
checked the same way, by status, message and param.

What real vLLM 0.32.0 answered (tiny-llama, max_model_len 512; run on 2026-11-28):

* ``{"prompt": "Hello world the adapter", "echo": true, "max_tokens": 0}`` -> 200, text
  ``"Hello world the adapter"``, finish_reason ``length``, usage prompt 4 / completion **1** /
  total 5 (the request runs with max_tokens 1; the hidden token counts).
* the same with ``stream`` + ``include_usage``: one chunk ``{"text": "Hello world the adapter",
  "finish_reason": "length", "prompt_token_ids": [630, 410, 276, 471], ...}``, then the usage
  chunk (completion_tokens 1, the only one with system_fingerprint), then ``[DONE]``.
* ``echo`` + ``max_tokens: 4`` (greedy): text = prompt + the 4 tokens' text; usage as without
  echo. Streamed: the first chunk is prompt + first token with ``prompt_token_ids``, the rest
  as usual; without ``include_usage`` the terminal chunk carries system_fingerprint.
* token ids ``[5, 17, 42, 3]`` + echo: the text is ``tokenizer.decode(ids)``
  (``"<|user|>+D<pad>"``: special tokens kept).
* ``max_tokens: 0`` without echo, or ``echo: false``: 400 ``max_tokens must be at least 1, got 0.
  (parameter=max_tokens, value=0)``, param ``max_tokens``; echo + ``min_tokens: 2``: 400
  ``min_tokens must be less than or equal to max_tokens=1, got 2.``; chat with echo and
  ``max_tokens: 0``: the same 400 as without echo.
* no ``max_tokens`` (or null) on /v1/completions: 16 tokens.
* chat ``echo`` with the user's message last: the content is not repeated, but
  ``prompt_logprobs`` is a list (``[null, {"288": {"logprob": ..., "rank": ...,
  "decoded_token": "hi"}}, ...]``, one per prompt token). With ``add_generation_prompt: false``
  the answer has the role ``user`` and starts with the user's content (stream: the role chunk
  ``{"role": "user", "content": ""}``, then ``{"content": "hi there"}``, then the tokens). An
  assistant message last with list content: repeated, text parts joined by ``"\\n"``.
  ``echo: null`` on chat: 400 ``bool_type`` at ``body.echo``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from vllm_e2e import BASE, REAL_CONFIG

from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.replica_protocol import detokenize
from loragate.twin.server import run_replica
from vllm_cpu.replica import Replica

pytestmark = pytest.mark.vllm

PROMPT = "Hello world the adapter"
IDS = [5, 17, 42, 3]
Detokenize = Callable[[list[int]], Awaitable[str]]


def extra(obj: Any) -> dict[str, Any]:
    """The fields the SDK's models do not declare (vLLM's extensions)."""
    return obj.model_extra or {}


async def check_echo(client: openai.AsyncOpenAI, detok: Detokenize) -> list[str]:
    """Every ``echo`` fact recorded in the module docstring; returns the ones that failed."""
    problems: list[str] = []

    def expect(ok: bool, label: str, seen: Any) -> None:
        if not ok:
            problems.append(f"{label}: {seen!r}")

    comp = client.completions
    # echo without generation
    out = await comp.create(model=BASE, prompt=PROMPT, echo=True, max_tokens=0, temperature=0)
    u = out.usage
    assert u is not None
    expect(out.choices[0].text == PROMPT, "echo 0: text", out.choices[0].text)
    expect(out.choices[0].finish_reason == "length", "echo 0: finish", out.choices[0])
    expect(u.completion_tokens == 1 and u.total_tokens == u.prompt_tokens + 1, "echo 0: usage", u)
    prompt_tokens = u.prompt_tokens
    stream = await comp.create(
        model=BASE,
        prompt=PROMPT,
        echo=True,
        max_tokens=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    seen = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices]
    expect(seen == [(PROMPT, "length")], "echo 0 stream: chunks", seen)
    ids = extra(chunks[0].choices[0]).get("prompt_token_ids") if chunks[0].choices else None
    expect(isinstance(ids, list) and len(ids) == prompt_tokens, "echo 0 stream: ids", ids)
    expect(
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1,
        "echo 0 stream: usage",
        chunks[-1].usage,
    )
    marks = [c.system_fingerprint is not None for c in chunks]
    expect(marks == [False, True], "echo 0 stream: fingerprint on the usage chunk", marks)

    # echo with generation
    common: dict[str, Any] = {
        "model": BASE,
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    plain = await comp.create(**common)
    echoed = await comp.create(echo=True, **common)
    text = echoed.choices[0].text
    expect(text == PROMPT + plain.choices[0].text, "echo 4: text", (text, plain.choices[0].text))
    expect(echoed.usage == plain.usage, "echo 4: usage", (echoed.usage, plain.usage))
    stream = await comp.create(echo=True, stream=True, **common)
    chunks = [c async for c in stream]
    texts = [c.choices[0].text for c in chunks]
    expect(
        len(texts) == 4 and texts[0].startswith(PROMPT) and len(texts[0]) > len(PROMPT),
        "echo 4 stream: one chunk per token, the prompt in the first",
        texts,
    )
    expect("".join(texts) == text, "echo 4 stream: same text", texts)
    ids = [extra(c.choices[0]).get("prompt_token_ids") for c in chunks]
    expect(isinstance(ids[0], list) and ids[1:] == [None] * 3, "echo 4 stream: ids", ids)
    marks = [c.system_fingerprint is not None for c in chunks]
    expect(marks == [False, False, False, True], "echo 4 stream: fingerprint", marks)

    # token-id prompt
    out = await comp.create(model=BASE, prompt=IDS, echo=True, max_tokens=0)
    expect(out.choices[0].text == await detok(IDS), "ids: text", out.choices[0].text)
    expect(
        out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (4, 1),
        "ids: usage",
        out.usage,
    )
    stream = await comp.create(model=BASE, prompt=IDS, echo=True, max_tokens=0, stream=True)
    chunks = [c async for c in stream]
    ids = [extra(c.choices[0]).get("prompt_token_ids") for c in chunks]
    expect(ids == [IDS], "ids stream: prompt_token_ids", ids)

    # several prompts, n = 2
    out = await comp.create(model=BASE, prompt=[PROMPT, "hi"], echo=True, max_tokens=0, n=2)
    texts = [c.text for c in out.choices]
    expect(texts == [PROMPT, PROMPT, "hi", "hi"], "n=2: texts", texts)
    expect(out.usage is not None and out.usage.completion_tokens == 4, "n=2: usage", out.usage)

    # defaults and refusals
    out = await comp.create(model=BASE, prompt=PROMPT, extra_body={"ignore_eos": True})
    expect(out.usage is not None and out.usage.completion_tokens == 16, "default max", out.usage)
    refusals: list[tuple[str, dict[str, Any], str, str | None]] = [
        (
            "comp",
            {"max_tokens": 0},
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
            "max_tokens",
        ),
        (
            "comp",
            {"max_tokens": 0, "echo": False},
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
            "max_tokens",
        ),
        (
            "comp",
            {"max_tokens": 0, "echo": True, "min_tokens": 2},
            "min_tokens must be less than or equal to max_tokens=1, got 2.",
            None,
        ),
        (
            "chat",
            {"max_tokens": 0, "echo": True},
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
            "max_tokens",
        ),
    ]
    for kind, body, message, param in refusals:
        try:
            if kind == "chat":
                await client.chat.completions.create(
                    model=BASE, messages=[{"role": "user", "content": "hi"}], extra_body=body
                )
            else:
                await comp.create(model=BASE, prompt=PROMPT, extra_body=body)
            problems.append(f"refusal {body}: accepted")
        except openai.BadRequestError as exc:
            err = exc.body if isinstance(exc.body, dict) else {}
            expect(
                (err.get("message"), err.get("param"), err.get("type"))
                == (message, param, "BadRequestError"),
                f"refusal {body}",
                err,
            )

    # chat
    chat = client.chat.completions
    user_last = [{"role": "user", "content": "hi there"}]
    opts: dict[str, Any] = {"model": BASE, "max_tokens": 3, "temperature": 0}
    plain_chat = await chat.create(messages=user_last, **opts)  # type: ignore[arg-type]
    out = await chat.create(
        messages=user_last,
        extra_body={"echo": True},  # type: ignore[arg-type]
        **opts,
    )
    expect(
        out.choices[0].message.content == plain_chat.choices[0].message.content,
        "chat echo, user last: content",
        out.choices[0].message.content,
    )
    logprobs = extra(out).get("prompt_logprobs")
    assert plain_chat.usage is not None
    expect(
        isinstance(logprobs, list)
        and len(logprobs) == plain_chat.usage.prompt_tokens
        and logprobs[0] is None
        and all(len(e) == 1 for e in logprobs[1:]),
        "chat echo: prompt_logprobs",
        logprobs,
    )
    out = await chat.create(
        messages=user_last,  # type: ignore[arg-type]
        extra_body={"echo": True, "add_generation_prompt": False},
        **opts,
    )
    content = out.choices[0].message.content or ""
    expect(
        out.choices[0].message.role == "user",
        "chat no gen prompt: role",  # type: ignore[comparison-overlap]
        out.choices[0].message.role,
    )
    expect(
        content.startswith("hi there") and len(content) > len("hi there"),
        "chat no gen prompt: content",
        content,
    )
    expect(
        out.usage is not None and out.usage.prompt_tokens < plain_chat.usage.prompt_tokens,
        "chat no gen prompt: fewer prompt tokens",
        out.usage,
    )
    prefill = [
        *user_last,
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Sure"}, {"type": "text", "text": "thing"}],
        },
    ]
    out = await chat.create(
        messages=prefill,
        extra_body={"echo": True},  # type: ignore[arg-type]
        **opts,
    )
    content = out.choices[0].message.content or ""
    expect(content.startswith("Sure\nthing"), "chat echo, assistant last", content)
    stream = await chat.create(
        messages=user_last,
        stream=True,  # type: ignore[arg-type]
        extra_body={"echo": True, "add_generation_prompt": False, "ignore_eos": True},
        **opts,
    )
    chunks = [c async for c in stream]
    deltas = [(c.choices[0].delta.role, c.choices[0].delta.content) for c in chunks]
    expect(
        deltas[:2] == [("user", ""), (None, "hi there")] and len(deltas) == 5,
        "chat echo stream",
        deltas,
    )
    marks = [c.system_fingerprint is not None for c in chunks]
    expect(marks == [False] * 4 + [True], "chat echo stream: fingerprint", marks)
    try:
        await chat.create(
            messages=user_last,
            extra_body={"echo": None},  # type: ignore[arg-type]
            **opts,
        )
        problems.append("chat echo null: accepted")
    except openai.BadRequestError as exc:
        err = exc.body if isinstance(exc.body, dict) else {}
        expect(
            err.get("param") == "body.echo" and "'bool_type'" in str(err.get("message")),
            "chat echo null",
            err,
        )
    return problems


def shape(obj: Any) -> Any:
    """Keys and JSON types, recursively (lists by their first element)."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(obj[0])] if obj else []
    return type(obj).__name__ if not isinstance(obj, int | float) else "number"


async def raw_bodies(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """The echo answers whose exact JSON shape must match (ids, clocks and text aside)."""
    calls = {
        "echo 0": ("/v1/completions", {"prompt": PROMPT, "echo": True, "max_tokens": 0}),
        "echo stream": (
            "/v1/completions",
            {"prompt": PROMPT, "echo": True, "max_tokens": 2, "stream": True},
        ),
        "chat echo": (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "echo": True, "max_tokens": 2},
        ),
    }
    out: dict[str, Any] = {}
    for label, (path, body) in calls.items():
        async with http.post(base + path, json=body) as r:
            text = await r.text()
        if body.get("stream"):
            out[label] = [
                json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")
            ]
        else:
            out[label] = json.loads(text)
    return out


async def test_echo_on_real_vllm_and_on_the_twin(
    real_vllm: Replica, http: aiohttp.ClientSession
) -> None:
    c = REAL_CONFIG
    twin_cfg = ReplicaConfig(
        model=str(real_vllm.model_dir),
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

    async def real_detok(ids: list[int]) -> str:
        async with http.post(real_vllm.base_url + "/detokenize", json={"tokens": ids}) as r:
            prompt: str = (await r.json())["prompt"]
            return prompt

    async def twin_detok(ids: list[int]) -> str:
        return detokenize(ids)

    problems: list[str] = []
    async with run_replica(twin_cfg, host="127.0.0.1", port=0) as twin:
        servers = [("real", real_vllm.base_url, real_detok), ("twin", twin.url, twin_detok)]
        for name, base, detok in servers:
            client = openai.AsyncOpenAI(
                base_url=base + "/v1", api_key="x", max_retries=0, timeout=120
            )
            try:
                problems += [f"{name}: {p}" for p in await check_echo(client, detok)]
            finally:
                await client.close()
        real, sim = await raw_bodies(http, real_vllm.base_url), await raw_bodies(http, twin.url)
    for label in real:
        if shape(real[label]) != shape(sim[label]):
            problems.append(
                f"shape of {label}:\n  real {shape(real[label])}\n  twin {shape(sim[label])}"
            )
    assert not problems, "echo differs from the recorded vLLM behaviour:\n" + "\n".join(problems)


# Context-window limits (max_model_len 512), token-id prompts so both servers count the same.
_FIT = "Make sure that `max_model_len` is no smaller than the number of text tokens"
_TOO_LONG = (
    "This model's maximum context length is 512 tokens. However, your prompt contains "
    "{} input tokens, which exceeds this limit even without any output tokens. Please "
    "reduce the length of the input prompt. (parameter=input_tokens, value={})"
)
LIMITS: list[tuple[str, dict[str, Any], tuple[str, str | None] | int]] = [
    ("/v1/completions", {"prompt": [1] * 4, "max_tokens": 510, "ignore_eos": True}, 508),
    (
        "/v1/completions",
        {"prompt": [1] * 4, "max_tokens": 600},
        (
            "max_tokens=600 cannot be greater than max_model_len=512. Please request fewer output "
            "tokens. (parameter=max_tokens, value=600)",
            "max_tokens",
        ),
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 600},
        (
            "max_completion_tokens=600 cannot be greater than max_model_len=512. Please request "
            "fewer output tokens. (parameter=max_completion_tokens, value=600)",
            "max_completion_tokens",
        ),
    ),
    (
        "/v1/completions",
        {"prompt": [1] * 512, "max_tokens": 1},
        ("max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", "max_tokens"),
    ),
    (
        "/v1/completions",
        {"prompt": [1] * 512, "max_tokens": 0, "echo": True},
        (
            "The decoder prompt (length 512) plus the number of requested output tokens "
            f"(at least 1) is longer than the maximum model length of 512. {_FIT} (prompt + "
            "requested output "
            "tokens).",
            None,
        ),
    ),
    (
        "/v1/completions",
        {"prompt": [1] * 513, "max_tokens": 1},
        (_TOO_LONG.format("at least 513", 513), "input_tokens"),
    ),
    (
        "/v1/completions",
        {"prompt": [1] * 600, "max_tokens": 1},
        (_TOO_LONG.format("600", 600), "input_tokens"),
    ),
    # and the SamplingParams check that follows those on max_tokens
    (
        "/v1/completions",
        {"prompt": [1] * 4, "n": 2, "temperature": 0},
        ("n must be 1 when using greedy sampling, got 2.", None),
    ),
]


async def test_context_limits_on_real_vllm_and_on_the_twin(
    real_vllm: Replica, http: aiohttp.ClientSession
) -> None:
    c = REAL_CONFIG
    twin_cfg = ReplicaConfig(
        model=str(real_vllm.model_dir),
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
    problems: list[str] = []
    async with run_replica(twin_cfg, host="127.0.0.1", port=0) as twin:
        for name, base in (("real", real_vllm.base_url), ("twin", twin.url)):
            for path, body, expected in LIMITS:
                async with http.post(base + path, json=body) as r:
                    status, answer = r.status, await r.json()
                if isinstance(expected, int):
                    seen: Any = (status, answer.get("usage", {}).get("completion_tokens"))
                    want: Any = (200, expected)
                else:
                    err = answer.get("error", {})
                    seen = (status, err.get("message"), err.get("param"), err.get("type"))
                    want = (400, *expected, "BadRequestError")
                if seen != want:
                    label = {
                        k: (f"[{len(v)} ids]" if k == "prompt" else v) for k, v in body.items()
                    }
                    problems.append(f"{name} {path} {label}:\n  got  {seen}\n  want {want}")
    assert not problems, "context limits differ from vLLM 0.32:\n" + "\n".join(problems)
