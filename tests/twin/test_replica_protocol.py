from __future__ import annotations

import json
from typing import Any

import pytest

from loragate.twin.replica_protocol import (
    PromptSpec,
    parse_generation_request,
    resolve_max_tokens,
)
from loragate.twin.synthetic_text import completion_prompt_tokens
from loragate.twin.vllm_errors import VllmApiError, parse_json_object


def error(kind: str, body: dict[str, Any]) -> VllmApiError:
    with pytest.raises(VllmApiError) as exc:
        parse_generation_request(kind, body)  # type: ignore[arg-type]
    return exc.value


def test_completion_fields() -> None:
    req = parse_generation_request(
        "completion",
        {
            "model": "lora-0",
            "prompt": "hello",
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        },
    )
    assert req.model == "lora-0" and req.max_tokens == 8 and req.greedy and req.ignore_eos
    assert req.stream and req.include_usage
    assert req.prompts == (
        PromptSpec(prompt_tokens=completion_prompt_tokens("hello"), key="hello", echo_text="hello"),
    )


def test_batched_and_token_prompts() -> None:
    req = parse_generation_request("completion", {"prompt": ["a b", "c"], "n": 2})
    assert len(req.prompts) == 2 and req.n == 2 and req.model is None
    req = parse_generation_request("completion", {"prompt": [1, 2, 3, 4]})
    assert req.prompts[0].prompt_tokens == 4


def test_chat_prefers_max_completion_tokens() -> None:
    req = parse_generation_request(
        "chat",
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 5,
            "max_completion_tokens": 3,
        },
    )
    assert req.max_tokens == 3 and req.kind == "chat"


def test_pydantic_style_type_errors() -> None:
    err = error("completion", {"prompt": "x", "max_tokens": "many", "stream": "perhaps"})
    assert err.status == 400 and err.err_type == "Bad Request" and err.param == "body.max_tokens"
    assert err.message.startswith("2 validation errors:\n  {'type': 'int_parsing', ")
    assert "'loc': 'body.stream'" in err.message
    err = error("chat", {"model": "m"})
    assert err.message == (
        "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', "
        "'msg': 'Field required', 'input': '<dict of 1 items>'}"
    )


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens must be at least 1, got 0."),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream=True"),
        ({"prompt": ""}, "Either prompt or prompt_embeds"),
        ({"prompt": "x", "n": 0}, "n must be at least 1"),
    ],
)
def test_value_errors(body: dict[str, Any], needle: str) -> None:
    err = error("completion", body)
    assert err.status == 400 and needle in err.message


def test_context_length_checks() -> None:
    spec = PromptSpec(prompt_tokens=10, key="")
    assert resolve_max_tokens("completion", spec, None, 512) == 502  # fills the window
    assert resolve_max_tokens("completion", spec, 502, 512) == 502
    with pytest.raises(VllmApiError) as exc:
        resolve_max_tokens("completion", spec, 503, 512)
    assert exc.value.message == (
        "'max_tokens' or 'max_completion_tokens' is too large: 503. This model's maximum "
        "context length is 512 tokens and your request has 10 input tokens (503 > 512 - 10)."
    )
    with pytest.raises(VllmApiError) as exc:
        resolve_max_tokens("chat", PromptSpec(prompt_tokens=512, key=""), None, 512)
    assert (
        exc.value.status == 400
        and "However, your request has 512 input tokens" in exc.value.message
    )


def test_malformed_json_is_a_validation_error() -> None:
    with pytest.raises(VllmApiError) as exc:
        parse_json_object(b'{"model": ')
    assert exc.value.status == 400
    assert "'type': 'json_invalid'" in exc.value.message
    assert json.loads(exc.value.body())["error"]["code"] == 400
    with pytest.raises(VllmApiError):
        parse_json_object(b"[1, 2]")
    with pytest.raises(VllmApiError):
        parse_json_object(b"")
