"""The checks vLLM 0.32 makes on a raw completions or chat body before any field is validated.

They are ``mode="before"`` model validators of ``CompletionRequest`` and
``ChatCompletionRequest`` (``entrypoints/openai/completion/protocol.py``,
``chat_completion/protocol.py``). Pydantic runs "before" model validators last-defined first, and
what they raise (a ``VLLMValidationError`` or a ``TypeError``, neither a ``ValueError``) is not
wrapped into a validation error: the first one that fails is vLLM's whole answer, a 400
``BadRequestError`` whatever else the body holds (a mistyped field, an unknown model).

Completions, in vLLM's order: the prompt list's length (``validate_prompt_list_length``), a
prompt at all (``validate_prompt_and_prompt_embeds``), ``stream_options`` without ``stream``
(``validate_stream_options``), the logprobs fields (``check_logprobs``). Chat: ``messages`` that
cannot be iterated (``check_system_message_content_type`` loops over them),
``continue_final_message`` with ``add_generation_prompt`` (``check_generation_prompt``), the
logprobs fields, then ``stream_options``. They read the raw JSON values: ``stream_options: {}``
is not checked, and ``stream: "no"`` counts as given. (Not made: the tools, structured-output
and ``response_format`` checks, whose fields the twin does not implement.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from loragate.twin.vllm_errors import bad_request

# vLLM's envs.VLLM_MAX_COMPLETION_PROMPTS: the longest list of prompts one completions request
# may hold (a list of token ids is one prompt, whatever its length).
MAX_COMPLETION_PROMPTS_ENV = "VLLM_MAX_COMPLETION_PROMPTS"
DEFAULT_MAX_COMPLETION_PROMPTS = 1024


def max_completion_prompts() -> int:
    """The limit as vLLM reads it: ``int()`` of the environment variable, else 1024."""
    return int(os.environ.get(MAX_COMPLETION_PROMPTS_ENV, str(DEFAULT_MAX_COMPLETION_PROMPTS)))


def check_completion_body(body: Mapping[str, Any], *, max_prompts: int | None = None) -> None:
    """A completions body's "before" checks, in vLLM's order; raises ``VllmApiError``."""
    check_prompt_list_length(body, max_prompts=max_prompts)
    check_prompt_given(body)
    check_stream_options(body)
    check_completion_logprobs(body)


def check_chat_body(body: Mapping[str, Any]) -> None:
    """A chat body's "before" checks, in vLLM's order; raises ``VllmApiError``."""
    messages = body.get("messages", [])
    if messages is None or type(messages) in (int, float, bool):
        # ``for msg in messages`` in a before validator: its TypeError is vLLM's answer.
        raise bad_request(f"'{type(messages).__name__}' object is not iterable")
    if body.get("continue_final_message") and body.get("add_generation_prompt"):
        raise bad_request(  # check_generation_prompt
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    check_chat_logprobs(body)
    check_stream_options(body)


def check_completion_logprobs(body: Mapping[str, Any]) -> None:
    """``CompletionRequest.check_logprobs`` (``logprobs`` is an int there)."""
    if body.get("logprob_token_ids") and body.get("use_beam_search"):
        raise bad_request(
            "`logprob_token_ids` is not supported with beam search.", param="logprob_token_ids"
        )
    if body.get("use_beam_search") and body.get("echo") and body.get("logprobs") is not None:
        raise bad_request(
            "`echo` with `logprobs` is not supported with beam search because beam search does "
            "not compute prompt logprobs.",
            param="echo",
        )
    if body.get("logprob_token_ids") and body.get("echo") and body.get("max_tokens") == 0:
        raise bad_request(
            "`logprob_token_ids` is not supported when `echo=True` and `max_tokens=0` because "
            "no output tokens are generated.",
            param="logprob_token_ids",
        )
    if body.get("logprob_token_ids") and body.get("logprobs") is None:
        raise bad_request(
            "when using `logprob_token_ids`, `logprobs` must be set.", param="logprob_token_ids"
        )
    _check_numbers(body, ("prompt_logprobs", "logprobs"))
    _check_prompt_logprobs(body)
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs < 0 and logprobs != -1:
        raise bad_request(
            "`logprobs` must be a positive value or -1.", param="logprobs", value=logprobs
        )


def check_chat_logprobs(body: Mapping[str, Any]) -> None:
    """``ChatCompletionRequest.check_logprobs`` (``logprobs`` is a bool there, the count is
    ``top_logprobs``)."""
    if body.get("logprob_token_ids") and body.get("use_beam_search"):
        raise bad_request(
            "`logprob_token_ids` is not supported with beam search.", param="logprob_token_ids"
        )
    if body.get("logprob_token_ids") and not body.get("logprobs"):
        raise bad_request(
            "when using `logprob_token_ids`, `logprobs` must be set to true.",
            param="logprob_token_ids",
        )
    _check_numbers(body, ("prompt_logprobs", "top_logprobs"))
    _check_prompt_logprobs(body)
    top = body.get("top_logprobs")
    if top is not None:
        if top < 0 and top != -1:
            raise bad_request(
                "`top_logprobs` must be a positive value or -1.", param="top_logprobs", value=top
            )
        if (top == -1 or top > 0) and not body.get("logprobs"):
            raise bad_request(
                "when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs"
            )


def _check_numbers(body: Mapping[str, Any], names: tuple[str, ...]) -> None:
    """The raw values compared below must be numbers (vLLM refuses others here rather than
    fail on the comparison)."""
    for name in names:
        value = body.get(name)
        if value is not None and not isinstance(value, int | float):
            raise bad_request(f"`{name}` must be an integer.", param=name, value=value)


def _check_prompt_logprobs(body: Mapping[str, Any]) -> None:
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is None:
        return
    if body.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
        raise bad_request(
            "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs"
        )
    if prompt_logprobs < 0 and prompt_logprobs != -1:
        raise bad_request(
            "`prompt_logprobs` must be a positive value or -1.",
            param="prompt_logprobs",
            value=prompt_logprobs,
        )


def check_prompt_list_length(body: Mapping[str, Any], *, max_prompts: int | None = None) -> None:
    """``validate_prompt_list_length``: a list of more than ``VLLM_MAX_COMPLETION_PROMPTS``
    prompts (texts or token-id lists; vLLM exempts a list whose first item is an int, i.e. one
    prompt of token ids) or ``prompt_embeds`` items."""
    limit = max_completion_prompts() if max_prompts is None else max_prompts
    prompt = body.get("prompt")
    if type(prompt) is list and len(prompt) > limit and not isinstance(prompt[0], int):
        raise bad_request(
            f"prompt list length {len(prompt)} exceeds the maximum allowed count of {limit}. "
            f"To increase this limit, set the {MAX_COMPLETION_PROMPTS_ENV} environment variable.",
            param="prompt",
        )
    embeds = body.get("prompt_embeds")
    if type(embeds) is list and len(embeds) > limit:
        raise bad_request(
            f"prompt_embeds list length {len(embeds)} exceeds the maximum allowed count of "
            f"{limit}. To increase this limit, set the {MAX_COMPLETION_PROMPTS_ENV} "
            "environment variable.",
            param="prompt_embeds",
        )


def check_prompt_given(body: Mapping[str, Any]) -> None:
    """``validate_prompt_and_prompt_embeds``: a completions body without a ``prompt`` (null or
    ``""``) nor ``prompt_embeds`` (null or ``[]``) is refused, ``param`` "prompt". Real vLLM 0.32
    answered exactly this to ``{}``, a null or empty ``prompt``, an empty ``prompt_embeds``, and
    with an unknown or mistyped ``model`` (``tests/e2e/test_vllm_parity.py``). An empty *list*
    passes it (the renderer refuses it once the model is known)."""
    if no_prompt(body) and body.get("prompt_embeds") in (None, []):
        raise bad_request(
            "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt"
        )


def no_prompt(body: Mapping[str, Any]) -> bool:
    """No ``prompt`` as vLLM's check sees it: absent, null or ``""``."""
    prompt = body.get("prompt")
    return prompt is None or prompt == ""


def check_stream_options(body: Mapping[str, Any]) -> None:
    """``validate_stream_options``: ``stream_options`` (truthy, as JSON) without a truthy
    ``stream``."""
    if body.get("stream_options") and not body.get("stream"):
        raise bad_request(
            "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
