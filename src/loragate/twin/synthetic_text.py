"""Deterministic stand-ins for a tokenizer and a sampler.

The simulated replica has no model, so text is synthetic; only token *counts* matter, and they
must be exact and reproducible: the engine schedules exactly ``prompt_tokens`` of prefill and
emits exactly one output token per decode step, and ``usage`` reports the same numbers.

Token counting: the text is split into pieces (a run of letters, of digits or of other
non-space characters, each with its leading space, or a run of whitespace); a piece counts
``ceil(len / MAX_PIECE_CHARS)`` tokens, its leading space not counted. A completion prompt adds
one BOS token; a token-id prompt counts its ids. A chat prompt is rendered by a minimal
template: BOS, ``CHAT_MESSAGE_OVERHEAD`` tokens of role markup per message, and
``CHAT_GENERATION_PROMPT`` tokens for the assistant header.

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
BOS_TOKENS = 1
CHAT_MESSAGE_OVERHEAD = 3
CHAT_GENERATION_PROMPT = 2

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


def completion_prompt_tokens(prompt: str | Sequence[int]) -> int:
    """Prompt tokens of a ``/v1/completions`` prompt: text (+BOS) or a list of token ids."""
    if isinstance(prompt, str):
        return BOS_TOKENS + count_text_tokens(prompt)
    return len(prompt)


def chat_prompt_tokens(message_texts: Iterable[str]) -> int:
    """Prompt tokens of a chat conversation, given each message's text content."""
    total = BOS_TOKENS + CHAT_GENERATION_PROMPT
    for text in message_texts:
        total += CHAT_MESSAGE_OVERHEAD + count_text_tokens(text)
    return total


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
