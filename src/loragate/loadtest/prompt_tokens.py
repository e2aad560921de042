"""How many tokens the target's tokenizer counts in the load test's prompts.

A workload spec gives prompt lengths in tokens; the load test sends that many words
(:func:`loragate.loadtest.openloop.prompt_of`), each one token in common tokenizers. Whether the
target agrees is measured once, before the run, when it has vLLM's ``POST /tokenize`` (at the
server's root, not under ``/v1``; loragate's gateway forwards it to a replica): one prompt of
:data:`PROBE_WORDS` words, nothing per request. A target without it (another server) is simply
not measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeGuard

import aiohttp

from loragate.loadtest.openloop import prompt_of

PROBE_WORDS = 256


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """What the target's tokenizer made of one prompt of ``words`` words."""

    words: int  # the spec's prompt tokens (the prompt's words)
    tokens: int | None  # the target's count (special tokens included); None: not measured
    why_not: str | None = None  # why not measured
    max_model_len: int | None = None  # the target's context, if it said

    def as_dict(self) -> dict[str, object]:
        per_word = None if self.tokens is None else round(self.tokens / self.words, 3)
        return {
            "words": self.words,
            "target_tokens": self.tokens,
            "tokens_per_word": per_word,
            "max_model_len": self.max_model_len,
            "source": "POST /tokenize" if self.tokens is not None else None,
            "not_measured": self.why_not,
        }


def root_of(base_url: str) -> str:
    """``http://host:port/v1`` (an OpenAI base) -> ``http://host:port``."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


async def measure_prompt_tokens(
    base_url: str,
    *,
    model: str | None,
    api_key: str | None,
    timeout_s: float,
    words: int = PROBE_WORDS,
    proxy: str | None = None,
) -> PromptTokens:
    """``POST {root}/tokenize`` of a prompt of ``words`` words; not measured (``why_not``) when
    the target has no such endpoint, refuses it or answers something else."""
    url = root_of(base_url) + "/tokenize"
    body: dict[str, object] = {"prompt": prompt_of(words, 0)}
    if model:
        body["model"] = model
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout_s), proxy=proxy
            ) as session,
            session.post(url, data=json.dumps(body).encode(), headers=headers) as resp,
        ):
            status, raw = resp.status, await resp.read()
    except TimeoutError:
        return PromptTokens(words, None, f"POST {url}: no answer within {timeout_s:g} s")
    except aiohttp.ClientError as exc:
        return PromptTokens(words, None, f"POST {url}: {type(exc).__name__}")
    if status != 200:
        return PromptTokens(words, None, f"POST {url} answered {status}")
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    count = doc.get("count") if isinstance(doc, dict) else None
    if not _natural(count):
        return PromptTokens(words, None, f"POST {url} answered no token count")
    context = doc.get("max_model_len") if isinstance(doc, dict) else None
    return PromptTokens(words, count, max_model_len=context if _natural(context) else None)


def _natural(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
