"""vLLM 0.32's "before" model validators on the simulated replica: the checks made on the raw
body ahead of field validation, whose error is the whole answer (``twin.request_prechecks``).

Read from vLLM 0.32.0's ``entrypoints/openai/completion/protocol.py``
(``validate_prompt_list_length``: ``VLLM_MAX_COMPLETION_PROMPTS``, 1024 by default, a list of
token ids exempt; ``validate_prompt_and_prompt_embeds``; ``validate_stream_options``) and
``chat_completion/protocol.py`` (``check_system_message_content_type`` iterates ``messages``);
pydantic runs "before" model validators last-defined first. Real vLLM's answers to the same
bodies: ``tests/e2e/test_vllm_parity.py`` (-m vllm)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from loragate.twin.replica_protocol import parse_generation_request
from loragate.twin.vllm_errors import VllmApiError

StartReplica = Callable[..., Any]
BASE = "tiny-llama"
TOO_MANY = (
    "prompt list length 1025 exceeds the maximum allowed count of 1024. To increase this limit, "
    "set the VLLM_MAX_COMPLETION_PROMPTS environment variable. (parameter=prompt)"
)
NO_PROMPT = "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"
STREAM_OPTIONS = "Stream options can only be defined when `stream=True`. (parameter=stream_options)"


def refusal(kind: str, body: dict[str, Any]) -> tuple[int, str, str | None, str]:
    with pytest.raises(VllmApiError) as exc:
        parse_generation_request(kind, body)  # type: ignore[arg-type]
    e = exc.value
    return e.status, e.err_type, e.param, e.message


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ["x"] * 1025},
        {"prompt": [[1, 2]] * 1025},
        {"prompt": [None] * 1025},  # before the items are validated
        # Before everything else: the model, the fields' types, stream_options.
        {"prompt": ["x"] * 1025, "model": 5, "max_tokens": "many", "stream_options": {"a": 1}},
    ],
)
def test_more_prompts_than_vllm_takes_are_refused_first(body: dict[str, Any]) -> None:
    assert refusal("completion", body) == (400, "BadRequestError", "prompt", TOO_MANY)


def test_the_limit_itself_and_token_ids_pass() -> None:
    assert len(parse_generation_request("completion", {"prompt": ["x"] * 1024}).prompts) == 1024
    # A list of token ids is one prompt, however long (vLLM looks at its first item only).
    assert len(parse_generation_request("completion", {"prompt": [7] * 2000}).prompts) == 1


def test_prompt_embeds_are_counted_too() -> None:
    status, err_type, param, message = refusal(
        "completion", {"prompt": "x", "prompt_embeds": ["AAAA"] * 1025}
    )
    assert (status, err_type, param) == (400, "BadRequestError", "prompt_embeds")
    assert message == (
        "prompt_embeds list length 1025 exceeds the maximum allowed count of 1024. To increase "
        "this limit, set the VLLM_MAX_COMPLETION_PROMPTS environment variable. "
        "(parameter=prompt_embeds)"
    )


def test_the_limit_is_vllms_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MAX_COMPLETION_PROMPTS", "3")
    assert len(parse_generation_request("completion", {"prompt": ["a", "b", "c"]}).prompts) == 3
    message = refusal("completion", {"prompt": ["a", "b", "c", "d"]})[3]
    assert message.startswith("prompt list length 4 exceeds the maximum allowed count of 3.")


@pytest.mark.parametrize(
    ("kind", "body", "param", "message"),
    [
        # Without a prompt, the prompt's check wins over stream_options.
        ("completion", {"stream_options": {"include_usage": True}}, "prompt", NO_PROMPT),
        # stream_options without stream, ahead of the fields' types.
        ("completion", {"prompt": "x", "stream_options": {"include_usage": True},
                        "max_tokens": "many"}, "stream_options", STREAM_OPTIONS),
        ("completion", {"prompt": "x", "stream_options": {"include_usage": True},
                        "stream": False}, "stream_options", STREAM_OPTIONS),
        ("chat", {"messages": "hi", "stream_options": "yes"}, "stream_options", STREAM_OPTIONS),
        # Chat messages that cannot be iterated: the validator's TypeError, without param.
        ("chat", {"messages": None}, None, "'NoneType' object is not iterable"),
        ("chat", {"messages": 3, "max_tokens": "x", "stream_options": {"a": 1}}, None,
         "'int' object is not iterable"),
    ],
)  # fmt: skip
def test_vllms_before_checks_in_vllms_order(
    kind: str, body: dict[str, Any], param: str | None, message: str
) -> None:
    assert refusal(kind, body) == (400, "BadRequestError", param, message)


_HI = [{"role": "user", "content": "hi"}]
_SO = {"include_usage": True}


@pytest.mark.parametrize(
    ("kind", "body", "param", "message"),
    [
        ("completion", {"prompt": "x", "logprobs": -2, "max_tokens": "many"}, "logprobs",
         "`logprobs` must be a positive value or -1. (parameter=logprobs, value=-2)"),
        ("completion", {"prompt": "x", "logprobs": "3"}, "logprobs",
         "`logprobs` must be an integer. (parameter=logprobs, value=3)"),
        ("completion", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs",
         "`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)"),
        ("completion", {"prompt": "x", "prompt_logprobs": -3}, "prompt_logprobs",
         "`prompt_logprobs` must be a positive value or -1. (parameter=prompt_logprobs, "
         "value=-3)"),
        ("completion", {"prompt": "x", "logprob_token_ids": [1]}, "logprob_token_ids",
         "when using `logprob_token_ids`, `logprobs` must be set. (parameter=logprob_token_ids)"),
        # Completions: stream_options before logprobs; chat: logprobs before stream_options.
        ("completion", {"prompt": "x", "logprobs": -2, "stream_options": _SO}, "stream_options",
         STREAM_OPTIONS),
        ("chat", {"messages": _HI, "top_logprobs": 2, "stream_options": _SO}, "top_logprobs",
         "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)"),
        ("chat", {"messages": _HI, "top_logprobs": -5, "logprobs": True}, "top_logprobs",
         "`top_logprobs` must be a positive value or -1. (parameter=top_logprobs, value=-5)"),
        ("chat", {"messages": _HI, "top_logprobs": "2"}, "top_logprobs",
         "`top_logprobs` must be an integer. (parameter=top_logprobs, value=2)"),
        ("chat", {"messages": _HI, "logprob_token_ids": [1]}, "logprob_token_ids",
         "when using `logprob_token_ids`, `logprobs` must be set to true. "
         "(parameter=logprob_token_ids)"),
        ("chat", {"messages": _HI, "continue_final_message": True, "add_generation_prompt": 1,
                  "top_logprobs": 2}, None,
         "Cannot set both `continue_final_message` and `add_generation_prompt` to True."),
    ],
)  # fmt: skip
def test_vllms_logprobs_and_generation_prompt_checks(
    kind: str, body: dict[str, Any], param: str | None, message: str
) -> None:
    assert refusal(kind, body) == (400, "BadRequestError", param, message)


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("completion", {"prompt": "x", "logprobs": 2, "prompt_logprobs": -1}),
        ("completion", {"prompt": "x", "logprobs": -1}),
        ("chat", {"messages": _HI, "logprobs": True, "top_logprobs": 2}),
        ("chat", {"messages": _HI, "top_logprobs": 0}),
        ("chat", {"messages": _HI, "continue_final_message": True}),
    ],
)
def test_logprobs_vllm_lets_through(kind: str, body: dict[str, Any]) -> None:
    parse_generation_request(kind, body)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "stream_options": {}},  # falsy in the raw JSON: not checked
        {"prompt": "x", "stream_options": None},
        {"prompt": "x", "stream_options": {"include_usage": True}, "stream": True},
    ],
)
def test_stream_options_vllm_lets_through(body: dict[str, Any]) -> None:
    parse_generation_request("completion", body)


async def test_the_replica_refuses_too_many_prompts_as_vllm(start_replica: StartReplica) -> None:
    async with (
        start_replica() as r,
        openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        with pytest.raises(openai.BadRequestError) as exc:
            await client.completions.create(model=BASE, prompt=["x"] * 1025, max_tokens=1)
        assert exc.value.status_code == 400
        assert exc.value.body == {
            "message": TOO_MANY,
            "type": "BadRequestError",
            "param": "prompt",
            "code": 400,
        }
        # Even for a model the replica does not serve: the check comes first.
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="nope", prompt=["x"] * 1025, max_tokens=1)
        out = await client.completions.create(model=BASE, prompt=["x", "y"], max_tokens=1)
        assert len(out.choices) == 2
