"""The checks vLLM 0.32 makes on a raw completions or chat body before any field is validated.

They are ``mode="before"`` model validators of ``CompletionRequest`` and
``ChatCompletionRequest`` (``entrypoints/openai/completion/protocol.py``,
``chat_completion/protocol.py``). Pydantic runs "before" model validators last-defined first, and
what they raise (a ``VLLMValidationError`` or a ``TypeError``, neither a ``ValueError``) is not
wrapped into a validation error: the first one that fails is vLLM's whole answer, a 400
``BadRequestError`` whatever else the body holds (a mistyped field, an unknown model).

Completions, in vLLM's order: the prompt list's length (``validate_prompt_list_length``), a
prompt at all (``validate_prompt_and_prompt_embeds``), ``stream_options`` without ``stream``
(``validate_stream_options``). Chat: ``messages`` that cannot be iterated
(``check_system_message_content_type`` loops over them), then ``stream_options``. They read the
raw JSON values: ``stream_options: {}`` is not checked, and ``stream: "no"`` counts as given.
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


def check_chat_body(body: Mapping[str, Any]) -> None:
    """A chat body's "before" checks, in vLLM's order; raises ``VllmApiError``."""
    messages = body.get("messages", [])
    if messages is None or type(messages) in (int, float, bool):
        # ``for msg in messages`` in a before validator: its TypeError is vLLM's answer.
        raise bad_request(f"'{type(messages).__name__}' object is not iterable")
    check_stream_options(body)


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
