"""``logprobs`` on the simulated replica: synthetic values in vLLM 0.32's shapes, read back
through the ``openai`` SDK (``twin.synthetic_logprobs`` says what real vLLM returned). Before,
the replica answered ``"logprobs": null`` whatever was asked, and no limit."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import openai
import pytest

from loragate.twin.server import RunningReplica

StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]  # (conftest's)
BASE = "tiny-llama"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 5, "extra_body": {"ignore_eos": True}}
CHAT = [{"role": "user", "content": "hi"}]


def _client(r: RunningReplica) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)


def _valid(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value <= 0


def _check_completion(lp: Any, text: str, count: int, n_tokens: int) -> None:
    """One choice's completions ``logprobs``: a token per entry, joined the text, offsets
    running, each entry's top: the token first, then ``count - 1`` others, best first."""
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_tokens
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n_tokens)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert _valid(value)
        assert next(iter(top)) == token and top[token] == value
        assert len(top) == max(count, 1) and all(_valid(v) for v in top.values())
        assert list(top.values()) == sorted(top.values(), reverse=True)


@pytest.mark.parametrize("count", [0, 1, 5, 20])
async def test_completions_logprobs(start_replica: StartReplica, count: int) -> None:
    async with start_replica() as r, _client(r) as client:
        out = await client.completions.create(model=BASE, prompt="hi", logprobs=count, **GREEDY)
        (choice,) = out.choices
        assert out.usage is not None
        _check_completion(choice.logprobs, choice.text, count, out.usage.completion_tokens)
        # A stream's chunks carry the same entries, text_offset running on.
        stream = await client.completions.create(
            model=BASE, prompt="hi", logprobs=count, stream=True, **GREEDY
        )
        parts = [c.choices[0].logprobs async for c in stream]
    assert choice.logprobs is not None
    assert [p.tokens for p in parts if p] == [[t] for t in choice.logprobs.tokens]
    assert [o for p in parts if p for o in p.text_offset or ()] == choice.logprobs.text_offset
    assert [p.top_logprobs[0] for p in parts if p and p.top_logprobs] == (
        choice.logprobs.top_logprobs
    )


async def test_completions_echo_lists_the_prompt_first(start_replica: StartReplica) -> None:
    async with start_replica() as r, _client(r) as client:
        out = await client.completions.create(
            model=BASE, prompt="hello world the", echo=True, logprobs=2, **GREEDY
        )
        only = await client.completions.create(
            model=BASE, prompt="hello world the", echo=True, logprobs=2, max_tokens=0
        )
    (choice,) = out.choices
    lp = choice.logprobs
    assert lp is not None and out.usage is not None
    prompt = out.usage.prompt_tokens
    assert lp.tokens is not None and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == prompt + out.usage.completion_tokens
    for token, top in zip(lp.tokens[1:prompt], lp.top_logprobs[1:prompt], strict=True):
        # a prompt token, then the 2 better ones
        assert next(iter(top)) == token and len(top) == 3
        assert top[token] < min(list(top.values())[1:])
    rows = (choice.model_extra or {})["prompt_logprobs"]
    assert rows[0] is None and len(rows) == prompt
    assert [next(iter(row.values()))["decoded_token"] for row in rows[1:]] == (lp.tokens[1:prompt])
    # echo without generation: the prompt's entries alone
    assert only.choices[0].logprobs is not None
    assert only.choices[0].logprobs.tokens == lp.tokens[:prompt]


@pytest.mark.parametrize("top", [None, 0, 3, 20])
async def test_chat_logprobs(start_replica: StartReplica, top: int | None) -> None:
    extra = {} if top is None else {"top_logprobs": top}
    async with start_replica() as r, _client(r) as client:
        out = await client.chat.completions.create(
            model=BASE, messages=CHAT, logprobs=True, **extra, **GREEDY
        )
        stream = await client.chat.completions.create(
            model=BASE, messages=CHAT, logprobs=True, stream=True, **extra, **GREEDY
        )
        chunks = [c async for c in stream]
    (choice,) = out.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert "".join(e.token for e in content) == choice.message.content
    for e in content:
        assert _valid(e.logprob) and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == (top or 0)
        if e.top_logprobs:
            assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and all(_valid(v) for v in values)
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    streamed = [c.choices[0].logprobs for c in chunks[1:]]
    assert [e for lp in streamed if lp and lp.content for e in lp.content] == content


async def test_prompt_logprobs_asked_alone(start_replica: StartReplica) -> None:
    # vLLM 0.32: a completion choice's prompt_logprobs, a chat body's; per prompt token
    # (none for the first) its id and the asked number of better ones, logprobs left null.
    async with start_replica() as r, _client(r) as client:
        out = await client.completions.create(
            model=BASE, prompt="hello world the", max_tokens=2, extra_body={"prompt_logprobs": 2}
        )
        chat = await client.chat.completions.create(
            model=BASE, messages=CHAT, max_tokens=2, extra_body={"prompt_logprobs": 1}
        )
    assert out.usage is not None and chat.usage is not None
    for rows, tokens, size in (
        ((out.choices[0].model_extra or {})["prompt_logprobs"], out.usage.prompt_tokens, 3),
        ((chat.model_extra or {})["prompt_logprobs"], chat.usage.prompt_tokens, 2),
    ):
        assert len(rows) == tokens and rows[0] is None
        assert {len(row) for row in rows[1:]} == {size}
        for row in rows[1:]:
            ranks = [e["rank"] for e in row.values()]
            assert ranks[1:] == list(range(1, size)) and ranks[0] > size
            assert all(_valid(e["logprob"]) for e in row.values())
    assert out.choices[0].logprobs is None and chat.choices[0].logprobs is None


async def test_without_logprobs_there_are_none(start_replica: StartReplica) -> None:
    async with start_replica() as r, _client(r) as client:
        out = await client.completions.create(model=BASE, prompt="hi", **GREEDY)
        chat = await client.chat.completions.create(model=BASE, messages=CHAT, **GREEDY)
        top_only = await client.chat.completions.create(
            model=BASE, messages=CHAT, logprobs=False, **GREEDY
        )
    assert out.choices[0].logprobs is None
    assert chat.choices[0].logprobs is None and top_only.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("kind", "fields", "message", "param"),
    [
        ("completion", {"logprobs": 21}, "Requested sample logprobs of 21", "logprobs"),
        ("completion", {"logprobs": -1}, "Requested sample logprobs of 1024", "logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "Requested sample logprobs of 21",
         "logprobs"),
        ("completion", {"prompt_logprobs": 25}, "Requested prompt logprobs of 25",
         "prompt_logprobs"),
        ("completion", {"logprobs": 30, "echo": True}, "Requested sample logprobs of 30",
         "logprobs"),
    ],
)  # fmt: skip
async def test_more_logprobs_than_vllm_allows_is_a_400(
    start_replica: StartReplica, kind: str, fields: dict[str, Any], message: str, param: str
) -> None:
    async with start_replica() as r, _client(r) as client:
        with pytest.raises(openai.BadRequestError) as info:
            if kind == "chat":
                await client.chat.completions.create(
                    model=BASE, messages=CHAT, max_tokens=2, extra_body=fields
                )
            else:
                await client.completions.create(
                    model=BASE, prompt="hi", max_tokens=2, extra_body=fields
                )
    body: Any = info.value.body
    assert body["message"] == f"{message}, which is greater than max allowed: 20 " + (
        f"(parameter={param}, value={message.rsplit(' ', 1)[1]})"
    )
    assert body["param"] == param and body["type"] == "BadRequestError"
