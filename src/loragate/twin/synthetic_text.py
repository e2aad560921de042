"""Deterministic stand-ins for a tokenizer and a sampler.

The simulated replica has no model, so text is synthetic; only token *counts* matter, and they
must be exact and reproducible: the engine schedules exactly ``prompt_tokens`` of prefill and
emits exactly one output token per decode step, and ``usage`` reports the same numbers.

Token counting: the text is split into pieces (a run of letters, of digits or of other
non-space characters, each with its leading space, or a run of whitespace); a piece counts
``ceil(len / MAX_PIECE_CHARS)`` tokens, its leading space not counted. A token-id prompt counts
its ids. What a model adds around the text is its tokenizer's and chat template's business, so
it comes from a ``PromptFormat`` (see there); the default is the bundled tiny-llama's
(``/work/shared/vllm-cpu/make_tiny_model.py``): no BOS, and a chat template of one role token
and one ``</s>`` per message plus one ``<|assistant|>`` token for the generation prompt.

Output: each request gets a plan (its tokens' texts and its finish reason) drawn from a seeded
RNG. ``ignore_eos`` gives exactly ``max_tokens``; otherwise an EOS position is drawn from an
exponential distribution with mean ``mean_output_tokens`` (at least ``min_tokens``); an EOS
before ``max_tokens`` ends the request with ``finish_reason="stop"`` and, as in vLLM, the EOS
token is counted in ``completion_tokens`` but adds no text.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

MAX_PIECE_CHARS = 7
# The bundled tiny-llama's chat template (``<|role|>content</s>`` per message, then
# ``<|assistant|>``): the defaults of ``PromptFormat``.
CHAT_MESSAGE_OVERHEAD = 2
CHAT_GENERATION_PROMPT = 1

_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")

# Synthetic vocabulary for generated text (short pieces, most with a leading space).
VOCAB: tuple[str, ...] = tuple(
    [
        " the",
        " a",
        " of",
        " and",
        " to",
        " in",
        " is",
        " that",
        " for",
        " it",
        " on",
        " with",
        " as",
        " was",
        " be",
        " by",
        " this",
        " are",
        " or",
        " not",
        " from",
        " model",
        " adapter",
        " token",
        " rank",
        " batch",
        " cache",
        " slot",
        " replica",
        " request",
        " gateway",
        " route",
        " load",
        " queue",
        " step",
        " time",
        " world",
        " hello",
        " data",
        " value",
        " answer",
        " question",
        " result",
        " system",
        " user",
        "ing",
        "ed",
        "er",
        "ly",
        "s",
        "tion",
        ".",
        ",",
        "?",
        "!",
        ":",
        ";",
        " -",
        "'s",
        " now",
        " here",
        " there",
        " then",
        " when",
        " what",
        " why",
        " how",
        " who",
        " 0",
        " 1",
        " 2",
        " 3",
        " 4",
        " 5",
        " 6",
        " 7",
        " 8",
        " 9",
        " 10",
        " 16",
        " 25",
        " 32",
        " 43",
        " 64",
        " 100",
        " 128",
        " 500",
        " 2048",
        " yes",
        " no",
        " maybe",
    ]
)

FinishReason = Literal["length", "stop"]


def count_text_tokens(text: str) -> int:
    """Tokens of ``text`` under the synthetic tokenizer (0 for the empty string)."""
    total = 0
    for piece in _PIECE.findall(text):
        core = piece.lstrip(" ") or piece  # the leading space rides along for free
        total += math.ceil(len(core) / MAX_PIECE_CHARS)
    return total


def text_tokens(text: str) -> list[str]:
    """``text`` cut into the synthetic tokenizer's tokens (``count_text_tokens`` of them, in
    order, joined: ``text``)."""
    tokens: list[str] = []
    for piece in _PIECE.findall(text):
        core = piece.lstrip(" ") or piece
        lead = piece[: len(piece) - len(core)]
        cuts = range(0, len(core), MAX_PIECE_CHARS)
        tokens += [(lead if i == 0 else "") + core[i : i + MAX_PIECE_CHARS] for i in cuts]
    return tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptFormat:
    """The tokens a model's tokenizer and chat template add around a prompt's text.

    Real tokenizers differ: whether encoding a text adds a BOS token is the tokenizer's config
    (``add_bos_token`` in ``tokenizer_config.json``, or the ``post_processor`` template of
    ``tokenizer.json``): Llama 2/3 and Mistral tokenizers add one, GPT-2-style byte-level BPE
    ones such as Qwen's and the bundled tiny-llama's add none. vLLM 0.32 encodes a completion
    prompt with ``add_special_tokens`` (a request field, default true: BOS if the tokenizer adds
    one) and a rendered chat with ``add_special_tokens`` false by default: a chat's BOS, if any,
    is written by the template itself (Llama 3's ``{{ bos_token }}``), counted here in
    ``chat_prefix_tokens``. Real vLLM with tiny-llama (``tests/e2e/test_vllm_parity.py``):
    "Hello world the adapter" is 4 prompt tokens, with or without ``add_special_tokens``; a chat
    of one user message "hi" is 4 (``<|user|>``, "hi", ``</s>``, ``<|assistant|>``), 3 with
    ``add_generation_prompt`` false.
    """

    add_bos: bool = False
    chat_prefix_tokens: int = 0
    chat_message_tokens: int = CHAT_MESSAGE_OVERHEAD
    chat_generation_prompt_tokens: int = CHAT_GENERATION_PROMPT

    def __post_init__(self) -> None:
        for name in ("chat_prefix_tokens", "chat_message_tokens", "chat_generation_prompt_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def completion_prompt_tokens(
        self, prompt: str | Sequence[int], *, add_special_tokens: bool = True
    ) -> int:
        """Prompt tokens of a ``/v1/completions`` prompt: its text's (plus BOS if the tokenizer
        adds one and the request lets it) or its token ids' count."""
        if isinstance(prompt, str):
            return int(self.add_bos and add_special_tokens) + count_text_tokens(prompt)
        return len(prompt)

    def chat_prompt_tokens(
        self,
        message_texts: Iterable[str],
        *,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
    ) -> int:
        """Prompt tokens of a chat conversation rendered by the template, given each message's
        text content (``add_special_tokens`` adds the tokenizer's BOS on top of the template's,
        as vLLM does)."""
        total = self.chat_prefix_tokens + int(self.add_bos and add_special_tokens)
        if add_generation_prompt:
            total += self.chat_generation_prompt_tokens
        for text in message_texts:
            total += self.chat_message_tokens + count_text_tokens(text)
        return total


TINY_LLAMA_FORMAT = PromptFormat()


def completion_prompt_tokens(prompt: str | Sequence[int]) -> int:
    """Prompt tokens of a ``/v1/completions`` prompt under the default ``PromptFormat``."""
    return TINY_LLAMA_FORMAT.completion_prompt_tokens(prompt)


def chat_prompt_tokens(message_texts: Iterable[str]) -> int:
    """Prompt tokens of a chat conversation under the default ``PromptFormat``."""
    return TINY_LLAMA_FORMAT.chat_prompt_tokens(message_texts)


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """What one request will generate: one text per output token, and why it stops."""

    token_texts: tuple[str, ...]
    finish_reason: FinishReason

    @property
    def num_tokens(self) -> int:
        return len(self.token_texts)

    @property
    def text(self) -> str:
        return "".join(self.token_texts)


class OutputSampler:
    """Seeded output plans: reproducible for a given ``--seed`` and request sequence.

    A greedy request (temperature 0) or one with its own ``seed`` gets the same output for the
    same model and prompt, like real greedy decoding; other requests draw from a per-replica
    sequence seeded by ``seed``.
    """

    def __init__(self, *, seed: int, mean_output_tokens: float) -> None:
        if mean_output_tokens <= 0:
            raise ValueError("mean_output_tokens must be > 0")
        self._seed = seed
        self._mean = mean_output_tokens
        self._counter = itertools.count()

    def plan(
        self,
        *,
        model: str,
        prompt_key: str,
        max_tokens: int,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        greedy: bool = False,
        request_seed: int | None = None,
    ) -> OutputPlan:
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if request_seed is not None:
            key = f"seed={request_seed}|{prompt_key}"
        elif greedy:
            key = f"greedy|{prompt_key}"
        else:
            key = f"draw={next(self._counter)}"
        rng = random.Random(f"{self._seed}|{model}|{key}")
        eos_at = max(min_tokens, 1 + int(-self._mean * math.log(1.0 - rng.random())))
        if ignore_eos or eos_at >= max_tokens:
            n, finish, eos_text = max_tokens, "length", False
        else:
            n, finish, eos_text = eos_at, "stop", True
        texts = [VOCAB[rng.randrange(len(VOCAB))] for _ in range(n)]
        if eos_text:
            texts[-1] = ""  # the EOS token is counted but not detokenized
        finish_reason: FinishReason = "length" if finish == "length" else "stop"
        return OutputPlan(tuple(texts), finish_reason)
