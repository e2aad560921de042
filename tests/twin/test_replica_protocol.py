from __future__ import annotations

import json
from typing import Any

import pytest

from loragate.twin.replica_protocol import (
    PromptSpec,
    check_prompt_count,
    parse_generation_request,
    resolve_all_max_tokens,
    resolve_max_tokens,
)
from loragate.twin.synthetic_text import PromptFormat, completion_prompt_tokens
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
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream=True"),
    ],
)
def test_value_errors(body: dict[str, Any], needle: str) -> None:
    err = error("completion", body)
    assert err.status == 400 and needle in err.message


# What real vLLM 0.32 answered to a completions body without a prompt (tests/e2e/
# test_vllm_parity.py): vLLM's "before" model validator, ahead of every field's validation and
# of the model lookup.
_NO_PROMPT = (
    "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)",
    "prompt",
)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"model": "m"},
        {"prompt": None},
        {"prompt": ""},
        {"prompt_embeds": []},
        {"prompt": None, "prompt_embeds": None},
        {"model": 5, "max_tokens": "abc"},  # (type errors come after it)
    ],
)
def test_a_completion_without_prompt(body: dict[str, Any]) -> None:
    err = error("completion", body)
    assert (err.status, err.err_type, err.message, err.param) == (400, "BadRequestError",
                                                                  *_NO_PROMPT)  # fmt: skip
    assert json.loads(err.body())["error"]["code"] == 400


_NO_EMBEDS = (
    "You must set `--enable-prompt-embeds` to input `prompt_embeds`. (parameter=prompt_embeds)"
)


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"prompt_embeds": "AAAA"}, _NO_EMBEDS, "prompt_embeds"),
        ({"prompt_embeds": ["AAAA"], "prompt": "x"}, _NO_EMBEDS, "prompt_embeds"),
        ({"prompt_embeds": "AAAA", "prompt": []}, _NO_EMBEDS, "prompt_embeds"),
        ({"prompt_embeds": "AAAA", "echo": True}, "Echo is unsupported with prompt embeds.", None),
    ],
)
def test_prompt_embeds_are_refused_once_the_model_is_known(
    body: dict[str, Any], message: str, param: str | None
) -> None:
    # vLLM's renderer refuses them (not started with --enable-prompt-embeds): the body passes
    # request validation, and the model is looked up first.
    gen = parse_generation_request("completion", body)
    with pytest.raises(VllmApiError) as exc:
        check_prompt_count(gen)
    err = exc.value
    assert (err.status, err.err_type, err.message, err.param) == (
        400,
        "BadRequestError",
        message,
        param,
    )
    # The fields are validated before: a mistyped one is the answer.
    assert error("completion", {**body, "max_tokens": "x"}).err_type == "Bad Request"


def test_empty_prompts_are_refused_where_vllm_refuses_them() -> None:
    # [] passes request validation; the renderer refuses it once the model is known.
    gen = parse_generation_request("completion", {"prompt": []})
    assert gen.prompts == ()
    with pytest.raises(VllmApiError) as exc:
        check_prompt_count(gen)
    assert (exc.value.err_type, exc.value.message, exc.value.param) == (
        "BadRequestError", "You must pass at least one prompt", None)  # fmt: skip
    for body in ({"messages": []}, {"messages": [], "add_generation_prompt": False}):
        gen = parse_generation_request("chat", body)
        with pytest.raises(VllmApiError) as exc:
            check_prompt_count(gen)
        assert (exc.value.err_type, exc.value.param) == ("BadRequestError", None)
        assert exc.value.message.startswith("Cannot apply chat template to an empty conversation")
    # An empty text (no BOS with tiny-llama's tokenizer) or id list: the engine's check, after
    # SamplingParams' ones.
    for prompt in ([""], [[]], ["hi", ""]):
        gen = parse_generation_request("completion", {"prompt": prompt})
        check_prompt_count(gen)
        with pytest.raises(VllmApiError) as exc:
            resolve_max_tokens(gen, gen.prompts[-1], 512)
        assert (exc.value.err_type, exc.value.message, exc.value.param) == (
            "BadRequestError", "The decoder prompt cannot be empty", None)  # fmt: skip
    gen = parse_generation_request("completion", {"prompt": [""], "max_tokens": 0})
    with pytest.raises(VllmApiError, match="max_tokens must be at least 1"):
        resolve_max_tokens(gen, gen.prompts[0], 512)
    # A tokenizer that adds BOS makes "" one token, which vLLM serves.
    gen = parse_generation_request("completion", {"prompt": [""]}, PromptFormat(add_bos=True))
    assert resolve_max_tokens(gen, gen.prompts[0], 512) == 16


def test_prompt_tokens_follow_the_prompt_format() -> None:
    llama = PromptFormat(add_bos=True, chat_prefix_tokens=1)
    text = {"prompt": "Hello world the adapter"}
    assert parse_generation_request("completion", text).prompts[0].prompt_tokens == 4
    assert parse_generation_request("completion", text, llama).prompts[0].prompt_tokens == 5
    no_special = {**text, "add_special_tokens": False}
    assert parse_generation_request("completion", no_special, llama).prompts[0].prompt_tokens == 4
    ids = {"prompt": [[1, 2, 3]]}
    assert parse_generation_request("completion", ids, llama).prompts[0].prompt_tokens == 3
    chat: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_generation_request("chat", chat).prompts[0].prompt_tokens == 4
    assert parse_generation_request("chat", chat, llama).prompts[0].prompt_tokens == 5
    special = {**chat, "add_special_tokens": True}
    assert parse_generation_request("chat", special, llama).prompts[0].prompt_tokens == 6
    no_header = {**chat, "add_generation_prompt": False}
    assert parse_generation_request("chat", no_header).prompts[0].prompt_tokens == 3
    err = error("completion", {**text, "add_special_tokens": None})  # a bool, not Optional
    assert err.param == "body.add_special_tokens"


# What real vLLM 0.32 answered with max_model_len 512 (tests/e2e/test_vllm_echo.py's run; a text
# prompt of 4 tokens, token-id prompts of 512 and 513 ids): the limit is checked on the
# requested max_tokens and the prompt, and a request that does not fit is clamped, not refused.
_FIT = "Make sure that `max_model_len` is no smaller than the number of text tokens"
CONTEXT_CASES: list[tuple[str, dict[str, Any], int | str, str | None]] = [
    ("completion", {"prompt": [1] * 4, "max_tokens": 510}, 508, None),  # clamped
    ("completion", {"prompt": [1] * 4, "max_tokens": 512}, 508, None),
    ("completion", {"prompt": [1] * 4}, 16, None),  # completions' default
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, 512 - 4, None),  # fills it
    (
        "completion",
        {"prompt": [1] * 4, "max_tokens": 600},
        "max_tokens=600 cannot be greater than max_model_len=512. Please request fewer output "
        "tokens. (parameter=max_tokens, value=600)",
        "max_tokens",
    ),
    (
        "chat",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 600},
        "max_completion_tokens=600 cannot be greater than max_model_len=512. Please request "
        "fewer output tokens. (parameter=max_completion_tokens, value=600)",
        "max_completion_tokens",
    ),
    (
        "completion",
        {"prompt": [1] * 512, "max_tokens": 1},  # no room left: clamped to 0
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        "max_tokens",
    ),
    (
        "completion",
        {"prompt": [1] * 512, "max_tokens": 0, "echo": True},
        "The decoder prompt (length 512) plus the number of requested output tokens (at least "
        f"1) is longer than the maximum model length of 512. {_FIT} (prompt + requested output "
        "tokens).",
        None,
    ),
    (
        "completion",
        {"prompt": [1] * 513, "max_tokens": 1},
        "This model's maximum context length is 512 tokens. However, your prompt contains at "
        "least 513 input tokens, which exceeds this limit even without any output tokens. "
        "Please reduce the length of the input prompt. (parameter=input_tokens, value=513)",
        "input_tokens",
    ),
    (
        "completion",
        {"prompt": [1] * 600, "max_tokens": 1},  # ids are not truncated: the exact count
        "This model's maximum context length is 512 tokens. However, your prompt contains 600 "
        "input tokens, which exceeds this limit even without any output tokens. Please reduce "
        "the length of the input prompt. (parameter=input_tokens, value=600)",
        "input_tokens",
    ),
    (
        "completion",
        {"prompt": "x " * 600, "max_tokens": 1},  # text is cut at 513 tokens
        "This model's maximum context length is 512 tokens. However, your prompt contains at "
        "least 513 input tokens, which exceeds this limit even without any output tokens. "
        "Please reduce the length of the input prompt. (parameter=input_tokens, value=513)",
        "input_tokens",
    ),
    (
        "completion",
        {"prompt": [1] * 4, "max_tokens": -1, "echo": True},
        "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)",
        "max_tokens",
    ),
    ("completion", {"prompt": [1] * 4, "max_tokens": 0, "echo": True}, 1, None),
    (
        "completion",
        {"prompt": [1] * 4, "max_tokens": 0, "echo": True, "min_tokens": 2},
        "min_tokens must be less than or equal to max_tokens=1, got 2.",
        None,
    ),
    (
        "completion",
        {"prompt": [1] * 4, "n": 2, "temperature": 0},
        "n must be 1 when using greedy sampling, got 2.",
        None,
    ),
    ("completion", {"prompt": [1] * 4, "n": 2, "temperature": 0.5}, 16, None),
    (
        "completion",
        {"prompt": [1] * 4, "min_tokens": -1},
        "min_tokens must be greater than or equal to 0, got -1.",
        None,
    ),
    # n: SamplingParams' first check, after the renderer's and before max_tokens'.
    (
        "completion",
        {"prompt": [1] * 4, "n": 0, "max_tokens": 0},
        "n must be at least 1, got 0.",
        None,
    ),
    (
        "completion",
        {"prompt": [1] * 4, "n": 0, "max_tokens": 600},
        "max_tokens=600 cannot be greater than max_model_len=512. Please request fewer output "
        "tokens. (parameter=max_tokens, value=600)",
        "max_tokens",
    ),
    (
        "completion",
        {"prompt": [1] * 4, "n": 16385},
        "n must be at most 16384, got 16385. To increase this limit, set the VLLM_MAX_N_SEQUENCES "
        "environment variable.",
        None,
    ),
    ("completion", {"prompt": [1] * 4, "n": 16384, "temperature": 0.5}, 16, None),
]


@pytest.mark.parametrize(("kind", "body", "expected", "param"), CONTEXT_CASES)
def test_context_length_and_sampling_checks(
    kind: str, body: dict[str, Any], expected: int | str, param: str | None
) -> None:
    gen = parse_generation_request(kind, body)  # type: ignore[arg-type]
    (spec,) = gen.prompts
    if isinstance(expected, int):
        assert resolve_max_tokens(gen, spec, 512) == expected
        return
    with pytest.raises(VllmApiError) as exc:
        resolve_max_tokens(gen, spec, 512)
    assert (exc.value.status, exc.value.err_type) == (400, "BadRequestError")
    assert (exc.value.message, exc.value.param) == (expected, param)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # The second prompt's renderer error comes before the first prompt's sampling error.
        (
            {"prompt": [[1, 2], [1] * 600], "min_tokens": -1},
            "This model's maximum context length is 512 tokens. However, your prompt contains "
            "600 input tokens, which exceeds this limit even without any output tokens. Please "
            "reduce the length of the input prompt. (parameter=input_tokens, value=600)",
        ),
        # The second prompt's sampling error comes before the first prompt's engine error.
        (
            {"prompt": [[], [1] * 512], "max_tokens": 1},
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        ),
    ],
)
def test_each_step_checks_every_prompt_before_the_next_step(
    body: dict[str, Any], message: str
) -> None:
    gen = parse_generation_request("completion", body)
    with pytest.raises(VllmApiError) as exc:
        resolve_all_max_tokens(gen, 512)
    assert exc.value.message == message
    assert resolve_all_max_tokens(parse_generation_request("completion", {"prompt": [[1], [2]]}),
                                  512) == [16, 16]  # fmt: skip


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


def test_validation_errors_render_as_vllms_handler_renders_them() -> None:
    """vLLM 0.32's validation handler: inputs summarised with ``str()`` (an int becomes
    ``'5'``), at most 10 errors listed, paths sanitised; the gateway's checks use the same."""
    from loragate.twin.vllm_errors import FieldError, validation_error

    msg = "Input should be a valid integer"
    errors = [FieldError(kind="int_type", loc=("body", "n"), msg=msg, input=5)] * 12
    err = validation_error(errors)
    lines = err.message.split("\n")
    assert lines[0] == "12 validation errors:"
    assert lines[1] == (
        "  {'type': 'int_type', 'loc': 'body.n', 'msg': 'Input should be a valid integer', "
        "'input': '5'}"
    )
    assert len(lines) == 12 and lines[-1] == "  ...and 2 more errors"
    assert (err.status, err.err_type, err.param) == (400, "Bad Request", "body.n")
    path = FieldError(kind="string_type", loc=("body", "model"), msg="m", input="/tmp/x/y.bin")
    assert "'input': '<path>'" in validation_error([path]).message
