"""The load test's prompts are the spec's length in tokens, and the target's count is reported.

A prompt of N words should be ~N tokens for real tokenizers: on real vLLM's tiny-llama
tokenizer, 400 of the former words ("alpha bravo charlie ...") were 2049 tokens, so a spec's
prompts overflowed a 512 context that the simulated replica (counting words) accepted.

- a small aiohttp server on loopback answers ``POST /tokenize`` as vLLM does, with a stand-in
  tokenizer that knows the most frequent English words (one token each, a leading space
  included) and spells other words byte by byte, as a small BPE vocabulary does;
- when the vLLM environment is installed, the bundled tiny-llama's own ``tokenizer.json`` counts
  the prompts (run by that environment's Python, which has ``tokenizers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from loadtest_files import summary_of

from loragate.cli import main
from loragate.loadtest.openloop import prompt_of
from loragate.loadtest.prompt_tokens import PROBE_WORDS

# The ~100 most frequent English words (of the usual frequency lists), a stand-in vocabulary.
_FREQUENT_TEXT = (
    "the be to of and a in that have i it for not on with he as you do at this but his by from "
    "they we say her she or an will my one all would there their what so up out if about who "
    "get which go me when make can like time no just him know take people into year your good "
    "some could them see other than then now look only come its over think also back after use "
    "two how our work first well way even new want because any these give day most us is are "
    "was were been has had more may"
)
FREQUENT = set(_FREQUENT_TEXT.split())
CONTEXT = 512

SPEC = """\
name: tiny
seed: 5
duration_s: 2
adapters: {count: 1, base_fraction: 0.5}
arrivals: {process: poisson, rate_rps: 20}
lengths: {prompt: 400, output: 2}
"""


def stand_in_tokens(text: str) -> int:
    """Frequent words one token each, others a token per character (a byte-level BPE)."""
    return sum(1 if w in FREQUENT else len(w) for w in text.split())


class Target:
    """vLLM's answers: completions (streamed, with usage) and ``POST /tokenize``."""

    def __init__(self) -> None:
        self.tokenized: list[dict[str, Any]] = []
        self.prompt_tokens: list[int] = []

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "base", "object": "model"}]})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.tokenized.append(body)
        count = stand_in_tokens(body["prompt"])
        return web.json_response(
            {"count": count, "max_model_len": CONTEXT, "tokens": list(range(count))}
        )

    async def complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        used = stand_in_tokens(body["prompt"])
        self.prompt_tokens.append(used)
        if used + body["max_tokens"] > CONTEXT:
            message = f"This model's maximum context length is {CONTEXT} tokens."
            return web.json_response({"error": {"message": message}}, status=400)
        usage = {"prompt_tokens": used, "completion_tokens": 2, "total_tokens": used + 2}
        choice = {"index": 0, "text": " a b", "finish_reason": "length"}
        return web.json_response({"id": "x", "choices": [choice], "usage": usage})


@contextlib.asynccontextmanager
async def serving(*, tokenize: bool) -> AsyncIterator[tuple[str, Target]]:
    target = Target()
    app = web.Application()
    app.router.add_get("/v1/models", target.models)
    app.router.add_post("/v1/completions", target.complete)
    if tokenize:
        app.router.add_post("/tokenize", target.tokenize)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", target
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()


async def loadtest(url: str, tmp_path: Path) -> int:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    args = ["loadtest", "--progress-s", "0", "--url", url, "--workload", str(spec),
            "--base-only", "--no-stream", "--max-requests", "8", "--timeout-s", "20",
            "--json", str(tmp_path / "summary.json")]  # fmt: skip
    return await asyncio.to_thread(main, args)


def test_every_prompt_word_is_a_frequent_word_so_n_words_are_n_tokens() -> None:
    for n, index in ((1, 0), (16, 3), (400, 7), (2048, 63)):
        prompt = prompt_of(n, index)
        assert len(prompt.split()) == n
        assert stand_in_tokens(prompt) == n, prompt[:120]


async def test_the_targets_token_count_is_measured_once_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(tokenize=True) as (url, target):
        code = await loadtest(url, tmp_path)
    out = capsys.readouterr()
    # 400-token prompts fit the 512 context: the prompts are as long as the spec says
    assert code == 0, out.out + out.err
    assert target.prompt_tokens == [400] * 8
    assert len(target.tokenized) == 1  # once at start-up, not per request
    assert target.tokenized[0] == {"prompt": prompt_of(PROBE_WORDS, 0), "model": "base"}
    assert summary_of(tmp_path)["prompt_tokens"] == {
        "words": PROBE_WORDS,
        "target_tokens": PROBE_WORDS,
        "tokens_per_word": 1.0,
        "max_model_len": CONTEXT,
        "source": "POST /tokenize",
        "not_measured": None,
    }
    line = f"prompts   {PROBE_WORDS} spec tokens (words) are {PROBE_WORDS} tokens for the "
    assert line in out.out
    assert "(1.00 per word, POST /tokenize, context 512 tokens)" in out.out


async def test_a_target_without_tokenize_runs_and_says_it_was_not_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serving(tokenize=False) as (url, _):
        code = await loadtest(url, tmp_path)
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    prompts = summary_of(tmp_path)["prompt_tokens"]
    assert prompts["target_tokens"] is None
    assert prompts["not_measured"] == f"POST {url}/tokenize answered 404"
    assert f"not measured by the target (POST {url}/tokenize answered 404)" in out.out


def _vllm_python_and_tokenizer() -> tuple[Path, Path]:
    root = Path("/tmp/loragate-vllm")
    python, tokenizer = root / "venv/bin/python", root / "models/tiny-llama/tokenizer.json"
    if not python.exists() or not tokenizer.exists():
        pytest.skip(f"no vLLM environment with tiny-llama in {root}")
    return python, tokenizer


def test_the_bundled_tiny_llama_tokenizer_counts_n_words_as_n_tokens() -> None:
    python, tokenizer = _vllm_python_and_tokenizer()
    prompts = [prompt_of(n, index) for n, index in ((1, 0), (16, 5), (400, 0), (400, 9))]
    script = (
        "import json, sys\n"
        "from tokenizers import Tokenizer\n"
        f"t = Tokenizer.from_file({str(tokenizer)!r})\n"
        "print(json.dumps([len(t.encode(p).ids) for p in json.load(sys.stdin)]))\n"
    )
    done = subprocess.run(
        [str(python), "-c", script],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(done.stdout) == [1, 16, 400, 400]
