"""Synthetic ``logprobs`` in the shapes vLLM 0.32 returns them.

The numbers are made up but valid: every logprob finite and at most 0, each position's
alternatives distinct token strings, best first after the chosen token, which ranks first (the
shape real vLLM returns for greedy decoding), the same for the same choice and position. What
real vLLM 0.32 answered (tiny-llama, ``tests/e2e/test_vllm_logprobs.py``):

* ``/v1/completions`` with ``logprobs: N``: each choice's ``logprobs`` is ``{"text_offset",
  "token_logprobs", "tokens", "top_logprobs"}``, one entry per token; ``top_logprobs`` holds a
  dict per token, the chosen token first then the best others, ``N`` entries (``N`` 0: the
  chosen one alone) when the chosen token is among the best ``N``
  (``completion/serving.py`` ``_create_completion_logprobs``: entries ``i <= N`` of the sampled
  token's dict, keyed by text). A stream's chunks carry their tokens' entries, ``text_offset``
  running on. With ``echo`` the prompt's tokens come first, the first with ``null`` logprob
  and entry, the others with the prompt token and ``N`` better ones; the choice also gets
  ``prompt_logprobs`` (ids to ``{logprob, rank, decoded_token}``).
* ``/v1/chat/completions`` with ``logprobs: true``: ``{"content": [{"token", "logprob",
  "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}]}``, ``top_logprobs`` the
  first ``top_logprobs`` entries (chosen first; 0: ``[]``). Role and echo chunks: ``null``.
* ``logprobs`` (chat: ``top_logprobs``) above ``--max-logprobs`` (20; -1 is the vocabulary,
  1024) is a 400 ``Requested sample logprobs of N, which is greater than max allowed: 20``,
  ``param`` "logprobs" (``SamplingParams._validate_logprobs``, when the engine takes the
  request); the prompt's the same as ``prompt_logprobs``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loragate.twin.synthetic_text import VOCAB
from loragate.twin.vllm_errors import bad_request

MAX_LOGPROBS = 20  # vLLM's ModelConfig.max_logprobs default
VOCAB_SIZE = 1024  # the recorded tiny-llama's: what -1 asks for
LOGPROB_FLOOR = -9999.0  # vLLM clamps -inf to this


def check_logprobs_limit(logprobs: int | None, prompt_logprobs: int | None) -> None:
    """``SamplingParams._validate_logprobs`` with the default ``--max-logprobs``."""
    for count, kind, param in ((logprobs, "sample", "logprobs"),
                               (prompt_logprobs, "prompt", "prompt_logprobs")):  # fmt: skip
        if not count:
            continue
        wanted = VOCAB_SIZE if count == -1 else count
        if wanted > MAX_LOGPROBS:
            raise bad_request(
                f"Requested {kind} logprobs of {wanted}, which is greater than max allowed: "
                f"{MAX_LOGPROBS}",
                param=param,
                value=wanted,
            )


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position: its token's text and logprob (None: a prompt's first token) and the
    entries listed for it, the token itself first (None: none, the prompt's first)."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] | None
    rank: int = 1


def _draw(key: str, position: int, token: str, alternatives: int) -> tuple[list[float], list[str]]:
    """The position's logprobs, best first (``MAX_LOGPROBS + 2`` of them), and its best other
    tokens: the same whatever the count asked for (its prefix)."""
    rng = random.Random(f"logprobs|{key}|{position}")
    values = [-rng.uniform(0.05, 3.0)]
    for _ in range(MAX_LOGPROBS + 1):
        values.append(values[-1] - rng.uniform(0.01, 1.5))
    order = list(VOCAB)
    rng.shuffle(order)
    return values, [t for t in order if t != token][:alternatives]


def output_logprob(key: str, position: int, token: str, alternatives: int) -> TokenLogprob:
    """A generated token (ranked first) and ``alternatives`` next best tokens."""
    values, others = _draw(key, position, token, alternatives)
    top = ((token, values[0]), *zip(others, values[1:], strict=False))
    return TokenLogprob(token, values[0], top)


def prompt_logprob(key: str, position: int, token: str, alternatives: int) -> TokenLogprob:
    """A prompt token (none for the first: nothing came before it) after ``alternatives``
    better tokens, as vLLM lists it (the token first, then the best ones)."""
    if position == 0:
        return TokenLogprob(token, None, None)
    values, others = _draw(key, position, token, alternatives)
    value = values[-1]  # below every better token listed
    rank = MAX_LOGPROBS + 1 + random.Random(f"rank|{key}|{position}").randrange(VOCAB_SIZE // 2)
    return TokenLogprob(token, value, ((token, value), *zip(others, values, strict=False)), rank)


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """A completion choice's (or chunk's) ``logprobs``; ``offset`` is the text before the
    first entry's token."""
    text_offset = []
    for entry in entries:
        text_offset.append(offset)
        offset += len(entry.token)
    return {
        "text_offset": text_offset,
        "token_logprobs": [e.logprob for e in entries],
        "tokens": [e.token for e in entries],
        "top_logprobs": [None if e.top is None else dict(e.top) for e in entries],
    }


def chat_logprobs(entries: Sequence[TokenLogprob], top_logprobs: int) -> dict[str, Any]:
    """A chat choice's (or chunk's) ``logprobs``: the first ``top_logprobs`` entries listed."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token.encode("utf-8", errors="replace")),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode("utf-8", errors="replace"))}
                    for t, v in (e.top or ())[:top_logprobs]
                ],
            }
            for e in entries
        ]
    }


def prompt_logprobs_field(
    entries: Sequence[TokenLogprob], token_ids: Sequence[int]
) -> list[dict[str, dict[str, Any]] | None]:
    """A choice's ``prompt_logprobs``: per prompt token (``null`` for the first), its id and
    the better ones' to ``{logprob, rank, decoded_token}`` (ids of the others: synthetic)."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for entry, token_id in zip(entries, token_ids, strict=True):
        if entry.top is None or entry.logprob is None:
            out.append(None)
            continue
        row = {str(token_id): {"logprob": entry.logprob, "rank": entry.rank,
                               "decoded_token": entry.token}}  # fmt: skip
        for rank, (text, value) in enumerate(entry.top[1:], start=1):
            other = VOCAB.index(text) + len(VOCAB)  # an id of its own that decodes to it
            if other == token_id:
                other += len(VOCAB)
            row[str(other)] = {"logprob": value, "rank": rank, "decoded_token": text}
        out.append(row)
    return out
