"""``POST /tokenize`` and ``POST /detokenize`` of the simulated replica, as vLLM 0.32 answers
them (recorded: ``bench/vllm_cpu/tokenize_transcript.md``), with the synthetic tokenizer.

vLLM 0.32 (``entrypoints/serve/tokenize/``): the body is ``TokenizeCompletionRequest |
TokenizeChatRequest`` (``prompt``, or ``messages`` rendered by the chat template) or
``DetokenizeRequest`` (``tokens``); the model is checked as a completion's is (the base model,
none, a registered adapter, or one the LoRA resolver finds and registers, else vLLM's 404), and
the adapter changes nothing: the base model's tokenizer counts (``lora_request`` is only
logged). The answer is ``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs``
null unless ``return_token_strs``) or ``{"prompt"}``.

Here the counts are the synthetic tokenizer's (``synthetic_text``: what ``usage.prompt_tokens``
of the same prompt says) and the ids synthetic: a piece of the output vocabulary is its index
there (so ``/detokenize`` gives back generated text), any other piece a stable id from its
bytes; the special tokens are the bundled tiny-llama's (``<s>`` 1, ``</s>`` 2, ``<|system|>`` 4,
``<|user|>`` 5, ``<|assistant|>`` 6, as real vLLM answered). ``/detokenize`` reads ids as the
echo of a token-id prompt does (``replica_protocol.detokenize``); an id past the vocabulary
reads as nothing, as real vLLM's.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loragate.twin.replica_protocol import (
    SYNTHETIC_VOCAB_SIZE,
    chat_message_texts,
    detokenize,
)
from loragate.twin.synthetic_text import VOCAB, PromptFormat, text_tokens
from loragate.twin.vllm_errors import (
    FieldError,
    json_invalid,
    missing,
    unparsable_body,
    validation_error,
)
from loragate.twin.vllm_fields import read_bool, read_str, read_token_list

BOS, EOS = 1, 2
_ROLE_IDS = {"system": 4, "user": 5, "assistant": 6}
_UNKNOWN = 0
_SPECIAL_STRS = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    4: "<|system|>",
    5: "<|user|>",
    6: "<|assistant|>",
}
_NOT_STR = "Input should be a valid string"
_NOT_OBJECT = "Input should be a valid dictionary or object to extract fields from"


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    """A checked ``/tokenize`` body: its ``model`` and what to tokenize."""

    model: str | None
    body: Mapping[str, Any]
    chat_texts: list[str] | None  # the messages' texts (a chat body), else None (a prompt)
    add_special_tokens: bool
    return_token_strs: bool
    add_generation_prompt: bool = True


def parse_json(raw: bytes, *, members: int) -> dict[str, Any]:
    """A body that must be a JSON object, read as FastAPI reads a body of a union of
    ``members`` request models (a non-object gets one error per member)."""
    if not raw.strip():
        raise validation_error([FieldError(kind="missing", loc=("body",), msg="Field required",
                                           input=None)])  # fmt: skip
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise json_invalid(exc) from exc
    except (ValueError, RecursionError) as exc:
        raise unparsable_body() from exc
    if not isinstance(data, dict):
        error = FieldError(kind="model_attributes_type", loc=("body",), msg=_NOT_OBJECT,
                           input=data)  # fmt: skip
        raise validation_error([error] * members)
    return data


def read_tokenize(body: dict[str, Any]) -> TokenizeRequest:
    """``TokenizeCompletionRequest | TokenizeChatRequest`` as pydantic reads the union: the
    first member the body fits, else both members' errors (the completion's first)."""
    prompt_errors: list[FieldError] = []
    model = read_str(body, "model", prompt_errors)
    if "prompt" not in body:
        prompt_errors.append(missing("prompt", body))
    else:
        read_str(body, "prompt", prompt_errors)
        if body["prompt"] is None:
            prompt_errors.append(
                FieldError(kind="string_type", loc=("body", "prompt"), msg=_NOT_STR, input=None)
            )
    special = read_bool(body, "add_special_tokens", prompt_errors, default=True, nullable=False)
    strs = read_bool(body, "return_token_strs", prompt_errors)
    if not prompt_errors:
        return TokenizeRequest(model, body, None, special, strs)
    chat_errors: list[FieldError] = []
    read_str(body, "model", chat_errors)
    texts: list[str] | None = None
    if "messages" not in body:
        chat_errors.append(missing("messages", body))
    else:
        texts, errors = chat_message_texts(body)
        chat_errors += errors
    generation = read_bool(body, "add_generation_prompt", chat_errors, default=True,
                           nullable=False)  # fmt: skip
    strs = read_bool(body, "return_token_strs", chat_errors)
    special = read_bool(body, "add_special_tokens", chat_errors, nullable=False)
    if chat_errors or texts is None:
        raise validation_error(prompt_errors + chat_errors)
    return TokenizeRequest(model, body, texts, special, strs, generation)


def read_detokenize(body: dict[str, Any]) -> tuple[str | None, list[int]]:
    """``DetokenizeRequest``: (model, tokens)."""
    errors: list[FieldError] = []
    model = read_str(body, "model", errors)
    tokens = read_token_list(body, "tokens", errors)
    if errors:
        raise validation_error(errors)
    return model, tokens


def piece_id(piece: str) -> int:
    """A text piece's synthetic id: its index in the output vocabulary, else a stable id from
    its bytes, above the vocabulary's pieces and within the model's vocabulary."""
    try:
        return VOCAB.index(piece)
    except ValueError:
        span = SYNTHETIC_VOCAB_SIZE - len(VOCAB)
        return len(VOCAB) + zlib.crc32(piece.encode()) % span


def tokenize(req: TokenizeRequest, fmt: PromptFormat, max_model_len: int) -> dict[str, Any]:
    """The answer: ids (and their strings) of the prompt, or of the rendered chat, whose count
    is what ``usage.prompt_tokens`` says of the same prompt."""
    ids: list[int] = []
    strs: list[str] = []

    def add(token_id: int, text: str) -> None:
        ids.append(token_id)
        strs.append(text)

    def add_text(text: str) -> None:
        for piece in text_tokens(text):
            add(piece_id(piece), piece.replace(" ", "\u0120"))  # byte-level BPE's space

    if req.chat_texts is None:
        if fmt.add_bos and req.add_special_tokens:
            add(BOS, _SPECIAL_STRS[BOS])
        add_text(str(req.body["prompt"]))
    else:
        for _ in range(fmt.chat_prefix_tokens + int(fmt.add_bos and req.add_special_tokens)):
            add(BOS, _SPECIAL_STRS[BOS])
        messages = req.body["messages"]
        for message, text in zip(messages, req.chat_texts, strict=True):
            role_id = _ROLE_IDS.get(str(message.get("role")), _UNKNOWN)
            overhead = fmt.chat_message_tokens
            if overhead:
                add(role_id, _SPECIAL_STRS[role_id])
            add_text(text)
            for _ in range(overhead - 1):
                add(EOS, _SPECIAL_STRS[EOS])
        if req.add_generation_prompt:
            for _ in range(fmt.chat_generation_prompt_tokens):
                add(_ROLE_IDS["assistant"], _SPECIAL_STRS[_ROLE_IDS["assistant"]])
    return {
        "count": len(ids),
        "max_model_len": max_model_len,
        "tokens": ids,
        "token_strs": strs if req.return_token_strs else None,
    }


def detokenized(tokens: list[int]) -> dict[str, Any]:
    """The answer: the ids' text (those past the vocabulary read as nothing)."""
    return {"prompt": detokenize([t for t in tokens if t < SYNTHETIC_VOCAB_SIZE])}
