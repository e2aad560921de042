"""``echo`` on the simulated replica, as vLLM 0.32.0 serves it (see ``replica_protocol``'s
docstring for the source lines), over a real socket with the official openai SDK.

Completions: the text is the prompt's text, then the generated text; ``max_tokens: 0`` returns
the prompt alone, yet one hidden token was generated and counts in ``usage`` (finish_reason
"length"). A stream carries the prompt in each choice's first chunk. Chat: the last message's
content is repeated when it has the answer's role.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest

from loragate.twin.replica_protocol import detokenize
from loragate.twin.synthetic_text import CHAT_GENERATION_PROMPT, completion_prompt_tokens

StartReplica = Callable[..., Any]
BASE = "tiny-llama"
PROMPT = "Hello world the adapter"


@asynccontextmanager
async def client_for(start_replica: StartReplica) -> AsyncIterator[openai.AsyncOpenAI]:
    async with start_replica(time_scale=50.0) as r:
        client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
        try:
            yield client
        finally:
            await client.close()


async def test_echo_without_generation_returns_the_prompt_and_counts_one_token(
    start_replica: StartReplica,
) -> None:
    async with client_for(start_replica) as client:
        out = await client.completions.create(
            model=BASE, prompt=PROMPT, echo=True, max_tokens=0, temperature=0
        )
        assert [c.text for c in out.choices] == [PROMPT]
        assert out.choices[0].finish_reason == "length"
        assert out.usage is not None
        prompt_tokens = completion_prompt_tokens(PROMPT)
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 1)
        assert out.usage.total_tokens == prompt_tokens + 1


async def test_echo_without_generation_streams_one_chunk_with_the_prompt(
    start_replica: StartReplica,
) -> None:
    async with client_for(start_replica) as client:
        stream = await client.completions.create(
            model=BASE,
            prompt=PROMPT,
            echo=True,
            max_tokens=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        texts = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices]
        assert texts == [(PROMPT, "length")]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1
        # the echoing chunk returns the prompt's token ids (synthetic ones for a text prompt)
        ids = (chunks[0].choices[0].model_extra or {})["prompt_token_ids"]
        assert isinstance(ids, list) and len(ids) == completion_prompt_tokens(PROMPT)
        # the fingerprint is on the usage chunk, the last one
        assert [c.system_fingerprint is not None for c in chunks] == [False, True]


async def test_echo_with_max_tokens_puts_the_prompt_before_the_same_generated_text(
    start_replica: StartReplica,
) -> None:
    async with client_for(start_replica) as client:
        common: dict[str, Any] = {
            "model": BASE,
            "prompt": PROMPT,
            "max_tokens": 6,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        plain = await client.completions.create(**common)
        echoed = await client.completions.create(echo=True, **common)
        generated = plain.choices[0].text
        assert generated and echoed.choices[0].text == PROMPT + generated
        assert echoed.usage == plain.usage  # the echoed prompt is not counted as completion
        assert echoed.usage is not None and echoed.usage.completion_tokens == 6

        stream = await client.completions.create(echo=True, stream=True, **common)
        events = [c async for c in stream]
        chunks = [c.choices[0].text for c in events]
        assert len(chunks) == 6  # the prompt rides on the first token's chunk, no extra event
        assert chunks[0].startswith(PROMPT) and len(chunks[0]) > len(PROMPT)
        assert "".join(chunks) == PROMPT + generated
        ids = [(c.choices[0].model_extra or {})["prompt_token_ids"] for c in events]
        assert len(ids[0]) == completion_prompt_tokens(PROMPT) and ids[1:] == [None] * 5
        # without a usage chunk the terminal chunk carries the fingerprint
        assert [c.system_fingerprint is not None for c in events] == [False] * 5 + [True]

        one = await client.completions.create(echo=True, stream=True, **{**common, "max_tokens": 1})
        (only,) = [c async for c in one]
        assert only.choices[0].text.startswith(PROMPT) and only.choices[0].finish_reason == "length"
        assert only.system_fingerprint is not None


async def test_echo_of_token_id_prompts_and_of_each_choice(
    start_replica: StartReplica,
) -> None:
    async with client_for(start_replica) as client:
        ids = [5, 17, 42, 3]
        out = await client.completions.create(model=BASE, prompt=ids, echo=True, max_tokens=0)
        assert out.choices[0].text == detokenize(ids) != ""
        assert out.usage is not None
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (4, 1)
        stream = await client.completions.create(
            model=BASE, prompt=ids, echo=True, max_tokens=0, stream=True
        )
        (chunk,) = [c async for c in stream]
        assert chunk.choices[0].text == detokenize(ids)
        assert (chunk.choices[0].model_extra or {})["prompt_token_ids"] == ids

        batch = await client.completions.create(
            model=BASE,
            prompt=[ids, [7, 8]],
            echo=True,
            max_tokens=2,
            n=2,
            extra_body={"ignore_eos": True},
        )
        starts = [detokenize(ids)] * 2 + [detokenize([7, 8])] * 2
        assert [c.index for c in batch.choices] == [0, 1, 2, 3]
        assert all(
            c.text.startswith(s) and len(c.text) > len(s)
            for c, s in zip(batch.choices, starts, strict=True)
        )
        assert batch.usage is not None and batch.usage.completion_tokens == 8


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (
            "completions",
            {"prompt": PROMPT, "max_tokens": 0},
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        ),
        (
            "completions",
            {"prompt": PROMPT, "max_tokens": 0, "echo": False},
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        ),
        (
            "completions",
            {"prompt": PROMPT, "max_tokens": -1, "echo": True},
            "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)",
        ),
        # the echo runs with max_tokens=1, so min_tokens is checked against 1
        (
            "completions",
            {"prompt": PROMPT, "max_tokens": 0, "echo": True, "min_tokens": 2},
            "min_tokens must be less than or equal to max_tokens=1, got 2.",
        ),
        # chat has no echo without generation
        (
            "chat",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0, "echo": True},
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        ),
    ],
)
async def test_what_stays_refused(
    start_replica: StartReplica, kind: str, body: dict[str, Any], message: str
) -> None:
    async with client_for(start_replica) as client:
        with pytest.raises(openai.BadRequestError) as exc:
            if kind == "chat":
                await client.chat.completions.create(
                    model=BASE, messages=body.pop("messages"), extra_body=body
                )
            else:
                await client.completions.create(
                    model=BASE, prompt=body.pop("prompt"), extra_body=body
                )
        assert exc.value.status_code == 400
        err = exc.value.body
        assert isinstance(err, dict) and err["message"] == message
        assert err["type"] == "BadRequestError"
        assert err["param"] == ("max_tokens" if message.startswith("max_tokens") else None)


async def test_echo_accepted_with_min_tokens_one(start_replica: StartReplica) -> None:
    async with client_for(start_replica) as client:
        out = await client.completions.create(
            model=BASE, prompt=PROMPT, echo=True, max_tokens=0, extra_body={"min_tokens": 1}
        )
        assert out.choices[0].text == PROMPT


async def test_chat_echo_repeats_the_last_message_of_the_answers_role(
    start_replica: StartReplica,
) -> None:
    async with client_for(start_replica) as client:
        opts: dict[str, Any] = {"model": BASE, "max_tokens": 3, "temperature": 0}
        user_last = [{"role": "user", "content": "hi there"}]
        plain = await client.chat.completions.create(messages=user_last, **opts)
        generated = plain.choices[0].message.content
        assert generated
        # the answer is the assistant's, the last message the user's: nothing to repeat
        out = await client.chat.completions.create(
            messages=user_last, extra_body={"echo": True}, **opts
        )
        assert out.choices[0].message.content == generated
        assert out.choices[0].message.role == "assistant"
        # echo asks for the prompt's logprobs: null, then one entry per prompt token
        assert plain.usage is not None and out.usage == plain.usage
        assert (plain.model_extra or {})["prompt_logprobs"] is None
        logprobs = (out.model_extra or {})["prompt_logprobs"]
        assert len(logprobs) == plain.usage.prompt_tokens and logprobs[0] is None
        assert all(
            len(entry) == 1
            and set(next(iter(entry.values()))) == {"logprob", "rank", "decoded_token"}
            for entry in logprobs[1:]
        )
        # without the generation prompt the answer continues the last message, in its role
        out = await client.chat.completions.create(
            messages=user_last, extra_body={"echo": True, "add_generation_prompt": False}, **opts
        )
        assert out.choices[0].message.role == "user"  # type: ignore[comparison-overlap]
        assert out.choices[0].message.content == "hi there" + generated
        assert out.usage is not None  # no assistant header in the prompt
        assert out.usage.prompt_tokens == plain.usage.prompt_tokens - CHAT_GENERATION_PROMPT
        # an assistant message last: repeated (list content: text parts joined by newlines)
        prefill = [
            *user_last,
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Sure"}, {"type": "text", "text": "thing"}],
            },
        ]
        out = await client.chat.completions.create(
            messages=prefill,  # type: ignore[arg-type]
            extra_body={"echo": True},
            **opts,
        )
        assert out.choices[0].message.content is not None
        assert out.choices[0].message.content.startswith("Sure\nthing")


async def test_chat_echo_stream_sends_the_repeated_content_after_the_role(
    start_replica: StartReplica,
) -> None:
    async with client_for(start_replica) as client:
        stream = await client.chat.completions.create(
            model=BASE,
            max_tokens=3,
            stream=True,
            messages=[{"role": "user", "content": "hi there"}],
            extra_body={"echo": True, "add_generation_prompt": False, "ignore_eos": True},
        )
        deltas = [(c.choices[0].delta.role, c.choices[0].delta.content) async for c in stream]
        assert deltas[:2] == [("user", ""), (None, "hi there")]
        assert len(deltas) == 2 + 3 and all(role is None for role, _ in deltas[2:])


async def test_chat_echo_must_be_a_boolean(start_replica: StartReplica) -> None:
    async with client_for(start_replica) as client:
        with pytest.raises(openai.BadRequestError) as exc:
            await client.chat.completions.create(
                model=BASE,
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"echo": None},
            )
        err = exc.value.body
        assert isinstance(err, dict) and err["param"] == "body.echo"
        assert "'type': 'bool_type'" in err["message"]
