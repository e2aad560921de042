"""The gateway refuses a completions or chat body exactly when vLLM 0.32 would, with vLLM's
answer (status 400, its error type, param and message, code 400), and serves what vLLM serves:
``max_tokens: 0`` with ``echo`` on ``/v1/completions`` among them.

The reference for request validation is pydantic itself (installed with the openai SDK) on
models declaring the fields the gateway reads as vLLM 0.32 declares them (``CompletionRequest``,
``ChatCompletionRequest``: the same types, in the same order, ``extra="allow"``, the wrap
validator every vLLM request model has), validated as FastAPI validates a body
(``validate_python(..., from_attributes=True)``, locations under ``body``), and rendered as
vLLM's validation handler renders the errors."""

from __future__ import annotations

import json
from typing import Annotated, Any

import aiohttp
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config

from loragate.gateway import running_gateway
from loragate.gateway.errors import VllmRequestError
from loragate.gateway.vllm_validation import (
    bad_request,
    check_body_object,
    check_max_tokens,
    missing_body,
    parse_body,
    read_chat,
    read_completion,
)
from loragate.twin import vllm_errors
from vllm_reference import clean_loc, input_summary

pydantic = pytest.importorskip("pydantic")

_PromptInt = Annotated[int, pydantic.Field(ge=0)]


class _VllmBase(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    @pydantic.model_validator(mode="wrap")
    @classmethod
    def __log_extra_fields__(cls, data: Any, handler: Any) -> Any:
        return handler(data)


class _Completion(_VllmBase):
    model: str | None = None
    prompt: list[_PromptInt] | list[list[_PromptInt]] | str | list[str] | None = None
    echo: bool | None = False
    max_tokens: int | None = 16
    stream: bool | None = False


class _Chat(_VllmBase):
    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = False


def _vllm_answer(model: type[pydantic.BaseModel], payload: Any) -> dict[str, Any] | None:
    """vLLM's request-validation answer to ``payload`` (None: it validates)."""
    try:
        pydantic.TypeAdapter(model).validate_python(payload, from_attributes=True)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
    else:
        return None
    lines = []
    for err in errors[:10]:  # at most 10 listed
        entry = {
            **err,
            "loc": clean_loc(("body", *err["loc"])),
            "input": input_summary(err["input"]),
        }
        text = str(entry)  # each entry cut at 1,000 characters
        lines.append(f"  {text if len(text) <= 1000 else text[:1000] + '...[truncated]'}\n")
    label = "error" if len(errors) == 1 else "errors"
    if len(errors) > 10:
        lines.append(f"  ...and {len(errors) - 10} more {label}\n")
    message = (f"{len(errors)} validation {label}:\n" + "".join(lines)).rstrip()
    param = clean_loc(("body", *errors[0]["loc"]))
    return {"message": message, "type": "Bad Request", "param": param, "code": 400}


def _gateway_answer(chat: bool, payload: dict[str, Any]) -> dict[str, Any] | None:
    try:
        (read_chat if chat else read_completion)(payload)
    except VllmRequestError as exc:
        return {"message": exc.message, "type": exc.err_type, "param": exc.param, "code": 400}
    return None


VALUES = [
    "5", "0", "-3", "5.0", "-0.0", "1e3", "5.5", "1e18", "1e19", "-1e19", "1e400", "-1e400",
    "NaN", "99999999999999999999", '"5"', '" 7 "', '"5.0"', '"1_000"', '"5."', '"1e3"', '""',
    '"true"', '"yes"', '"off"', '" true "', '"2"', "true", "false", "1.0", "0.5", "2", "null",
    "[5]", "{}", '"' + "9" * 5000 + '"',
]  # fmt: skip
FIELDS = {
    False: ["model", "prompt", "echo", "max_tokens", "stream"],
    True: ["messages", "model", "max_tokens", "max_completion_tokens", "stream"],
}
_BASE_BODY = {False: {"prompt": "p"}, True: {"messages": [{"role": "user", "content": "hi"}]}}


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("raw", VALUES)
def test_each_field_is_refused_as_vllm_refuses_it(chat: bool, raw: str) -> None:
    for field in FIELDS[chat]:
        payload = {**_BASE_BODY[chat], field: json.loads(raw)}
        if field == "prompt" and payload["prompt"] in (None, ""):
            continue  # vLLM's own check, before validation (below)
        if field == "messages" and not isinstance(payload["messages"], str | dict):
            # Not iterable: vLLM's own TypeError (below); a list: the gateway leaves its
            # items to the replica.
            continue
        expected = _vllm_answer(_Chat if chat else _Completion, payload)
        assert _gateway_answer(chat, payload) == expected, (field, raw)


@pytest.mark.parametrize(
    "prompt", [["a", 1], [-1], [[1], "a"], [1e19], ["x", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
)
def test_a_bad_prompt_list_is_listed_with_the_other_bad_fields(prompt: list[Any]) -> None:
    # The gateway refuses the body for its max_tokens: it lists the prompt's errors as vLLM
    # does (twin.vllm_fields.read_prompt), not only the field it reads.
    payload = {"prompt": prompt, "max_tokens": 5.5}
    assert _gateway_answer(False, payload) == _vllm_answer(_Completion, payload)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_every_bad_field_is_listed_and_the_first_is_the_param(chat: bool) -> None:
    payload: dict[str, Any] = dict.fromkeys(FIELDS[chat], 5.5)
    payload["messages" if chat else "prompt"] = "x" if chat else 7.0
    expected = _vllm_answer(_Chat if chat else _Completion, payload)
    assert expected is not None and expected["message"].startswith(
        "5 validation errors" if chat else "8 validation errors"
    )
    assert _gateway_answer(chat, payload) == expected
    missing = {"model": 5}  # chat without messages
    if chat:
        assert _gateway_answer(chat, missing) == _vllm_answer(_Chat, missing)


_STREAM_OPTIONS = (
    "Stream options can only be defined when `stream=True`. (parameter=stream_options)"
)


@pytest.mark.parametrize(
    ("chat", "payload", "message", "param"),
    [
        (False, {}, "Either prompt or prompt_embeds must be provided and non-empty. "
                    "(parameter=prompt)", "prompt"),
        (False, {"prompt": "", "max_tokens": 5.5}, "Either prompt or prompt_embeds must be "
                                                   "provided and non-empty. (parameter=prompt)",
         "prompt"),
        (False, {"prompt": None, "prompt_embeds": []}, "Either prompt or prompt_embeds must be "
                                                       "provided and non-empty. "
                                                       "(parameter=prompt)", "prompt"),
        (True, {"messages": None}, "'NoneType' object is not iterable", None),
        (True, {"messages": 3}, "'int' object is not iterable", None),
        (True, {"messages": True, "max_tokens": "x"}, "'bool' object is not iterable", None),
        (False, {"prompt": ["p"] * 1025, "max_tokens": 5.5}, "prompt list length 1025 exceeds "
         "the maximum allowed count of 1024. To increase this limit, set the "
         "VLLM_MAX_COMPLETION_PROMPTS environment variable. (parameter=prompt)", "prompt"),
        (False, {"prompt": "p", "stream_options": {"include_usage": True}, "max_tokens": 5.5},
         _STREAM_OPTIONS, "stream_options"),
        (True, {"messages": "m", "stream_options": {"include_usage": True}, "stream": 0},
         _STREAM_OPTIONS, "stream_options"),
    ],
)  # fmt: skip
def test_vllms_own_checks_come_before_field_validation(
    chat: bool, payload: dict[str, Any], message: str, param: str | None
) -> None:
    assert _gateway_answer(chat, payload) == {
        "message": message, "type": "BadRequestError", "param": param, "code": 400,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("message", "param", "value"),
    [
        ("max_tokens must be at least 1, got 0.", "max_tokens", 0),
        ("Either prompt or prompt_embeds must be provided and non-empty.", "prompt", None),
        ("'int' object is not iterable", None, None),
        ("bad value", None, -1),
        ("Could not read /tmp/x/adapter_config.json at 0x7f3a2b>", "lora_path", "/opt/a/b"),
    ],
)
def test_bad_request_is_the_simulated_replicas(message: str, param: str | None, value: Any) -> None:
    """One rendering of vLLM's ``VLLMValidationError``: the gateway's answer is the simulated
    replica's (``twin.vllm_errors.bad_request``), field for field."""
    ours = bad_request(message, param=param, value=value)
    replica = vllm_errors.bad_request(message, param=param, value=value)
    assert (ours.message, ours.err_type, ours.param) == (
        replica.message, replica.err_type, replica.param,
    )  # fmt: skip
    assert replica.status == 400


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"prompt": ', {"type": "json_invalid", "loc": "body.11", "msg": "JSON decode error",
                          "input": "<dict of 0 items>", "ctx": {"error": "Expecting value"}}),
        (b"null", {"type": "missing", "loc": "body", "msg": "Field required", "input": "None"}),
        (b"[1, 2]", {"type": "model_attributes_type", "loc": "body",
                     "msg": "Input should be a valid dictionary or object to extract fields from",
                     "input": "<list of 2 items>"}),
    ],
)  # fmt: skip
def test_a_body_that_is_no_json_object(body: bytes, expected: dict[str, Any]) -> None:
    with pytest.raises(VllmRequestError) as exc:
        check_body_object(parse_body(body))
    assert exc.value.err_type == "Bad Request" and exc.value.param == expected["loc"]
    assert exc.value.message == f"1 validation error:\n  {expected}"
    if body != b'{"prompt": ':  # (FastAPI's own error, not pydantic's)
        reference = _vllm_answer(_Completion, json.loads(body))
        if body == b"null":  # FastAPI: a required body that is null is missing
            reference = {**(reference or {}), "message": exc.value.message, "param": "body"}
        assert reference is not None and reference["message"] == exc.value.message
    assert missing_body().message == "1 validation error:\n  " + str(
        {"type": "missing", "loc": "body", "msg": "Field required", "input": "None"}
    )


def test_a_body_that_cannot_be_decoded() -> None:
    for body in (b"\xff\xfe not utf8", b"[" * 100_000, b"[" + b"9" * 5000 + b"]"):
        with pytest.raises(VllmRequestError) as exc:
            parse_body(body)
        assert (exc.value.message, exc.value.err_type) == (
            "There was an error parsing the body", "Bad Request",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("chat", "payload", "refused"),
    [
        (False, {"prompt": "p", "max_tokens": 0, "echo": True}, None),
        (False, {"prompt": "p", "max_tokens": 0.0, "echo": "yes"}, None),
        (False, {"prompt": "p", "max_tokens": False, "echo": 1}, None),  # lax: false is 0
        (False, {"prompt": "p", "max_tokens": 0}, 0),
        (False, {"prompt": "p", "max_tokens": 0, "echo": False}, 0),
        (False, {"prompt": "p", "max_tokens": -1, "echo": True}, -1),
        (False, {"prompt": "p", "max_tokens": None, "echo": True}, None),
        (True, {"messages": [], "max_tokens": 0, "echo": True}, 0),  # chat: no such exception
        (True, {"messages": [], "max_completion_tokens": None, "max_tokens": 0}, 0),
        (True, {"messages": [], "max_completion_tokens": 3, "max_tokens": 0}, None),
        (True, {"messages": [], "max_completion_tokens": -2, "max_tokens": 4}, -2),
    ],
)
def test_max_tokens_below_1_is_refused_unless_echo_with_0(
    chat: bool, payload: dict[str, Any], refused: int | None
) -> None:
    _, _, max_tokens, echo = (read_chat if chat else read_completion)(payload)
    if refused is None:
        check_max_tokens(max_tokens, echo)
        return
    with pytest.raises(VllmRequestError) as exc:
        check_max_tokens(max_tokens, echo)
    assert (exc.value.message, exc.value.err_type, exc.value.param) == (
        f"max_tokens must be at least 1, got {refused}. (parameter=max_tokens, value={refused})",
        "BadRequestError",
        "max_tokens",
    )


async def test_echo_with_max_tokens_0_reaches_the_replica_over_the_gateway(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    echo = {"model": "lora-1", "prompt": "hello", "max_tokens": 0, "echo": True}
    async with (
        running_gateway(gateway_config([rep.url]), port=0) as gw,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(gw.url + "/v1/completions", json=echo) as resp:
            assert resp.status == 200, await resp.text()
        # Without echo vLLM refuses it: so does the gateway, with vLLM's answer (a short
        # prompt and no other field: nothing vLLM checks first can fire; see
        # test_vllm_answer_order.py for the bodies the replica answers).
        async with http.post(gw.url + "/v1/completions", json={**echo, "echo": False}) as resp:
            assert resp.status == 400
            assert await resp.json() == {
                "error": {
                    "message": "max_tokens must be at least 1, got 0. "
                    "(parameter=max_tokens, value=0)",
                    "type": "BadRequestError",
                    "param": "max_tokens",
                    "code": 400,
                }
            }
        # Chat: the template's tokens count against max_model_len first; the replica answers.
        chat = {"model": BASE, "messages": [], "max_tokens": 0}
        async with http.post(gw.url + "/v1/chat/completions", json=chat) as resp:
            assert resp.status == 200  # (this scripted replica serves anything)
        # A model vLLM does not know is its 404 first (the gateway's own), as on a replica.
        async with http.post(
            gw.url + "/v1/completions", json={**echo, "model": "nope", "echo": False}
        ) as resp:
            assert resp.status == 404
    assert rep.requests == [echo, chat]  # forwarded as the client wrote them
