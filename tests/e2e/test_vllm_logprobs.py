"""``logprobs`` on real vLLM 0.32 and on the simulated replica: the same requests, the same
shapes (keys and JSON types; a completions' ``top_logprobs`` entry and ``prompt_logprobs`` row
are maps keyed by token text or id), the same counts, valid values, and the same 400 for more
than ``--max-logprobs`` (20). What real vLLM answered (2026-11-28, tiny-llama): see
``loragate.twin.synthetic_logprobs``. Values differ: real vLLM's come from the model."""

from __future__ import annotations

import json
import math
from typing import Any

import aiohttp
import pytest
from vllm_e2e import BASE, REAL_CONFIG

from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from vllm_cpu.replica import Replica

pytestmark = pytest.mark.vllm

GREEDY = {"model": BASE, "temperature": 0, "ignore_eos": True}
CHAT = {**GREEDY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
COMP = {**GREEDY, "prompt": "Hello world the adapter", "max_tokens": 3}
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {**COMP, "logprobs": 2}),
    ("/v1/completions", {**COMP, "logprobs": 0, "stream": True}),
    ("/v1/completions", {**COMP, "logprobs": 3, "n": 2, "temperature": 1.0, "seed": 1}),
    ("/v1/completions", {**COMP, "logprobs": 1, "echo": True}),
    ("/v1/completions", {**COMP, "logprobs": 1, "echo": True, "stream": True}),
    ("/v1/completions", {**COMP, "logprobs": 1, "echo": True, "max_tokens": 0}),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 3, "stream": True}),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}),
]
# Without logprobs: the prompt's alone (completions: the choice's; chat: the body's).
PROMPT_ONLY: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {**COMP, "prompt_logprobs": 2}),
    ("/v1/completions", {**COMP, "prompt_logprobs": 0}),
    ("/v1/chat/completions", {**CHAT, "prompt_logprobs": 1}),
    ("/v1/chat/completions", {**CHAT, "echo": True}),
]
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {**COMP, "logprobs": 21}),
    ("/v1/completions", {**COMP, "logprobs": -1}),
    ("/v1/completions", {**COMP, "prompt_logprobs": 25}),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}),
]


def shape(obj: Any, key: str = "") -> Any:
    """Keys and JSON types, recursively (lists by their first element that is not null);
    dicts keyed by token text or id (``top_logprobs`` of completions, ``prompt_logprobs``
    rows) by one value's shape."""
    if isinstance(obj, dict):
        if key in ("top_logprobs", "prompt_logprobs"):
            return {"*": shape(next(iter(obj.values()))) if obj else None}
        return {k: shape(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        items = [v for v in obj if v is not None]
        return [shape(items[0], key)] if items else []
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "bool"
    return "number" if isinstance(obj, int | float) else "string"


def _valid(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value <= 0


def problems_of(body: dict[str, Any], call: dict[str, Any]) -> list[str]:
    """What is wrong with a (merged) answer's logprobs, as the request asked for them."""
    out: list[str] = []
    for choice in body["choices"]:
        lp = choice["logprobs"]
        if "messages" in call:
            top = call.get("top_logprobs", 0)
            for e in lp["content"]:
                if not _valid(e["logprob"]) or len(e["top_logprobs"]) != top:
                    out.append(f"chat entry {e}")
            continue
        count, tokens = call["logprobs"], lp["tokens"]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        if lp["text_offset"] != offsets:
            out.append(f"text_offset {lp['text_offset']} for tokens {tokens}")
        for i, (value, top) in enumerate(zip(lp["token_logprobs"], lp["top_logprobs"],
                                             strict=True)):  # fmt: skip
            if call.get("echo") and i == 0:
                if value is not None or top is not None:
                    out.append(f"echo's first entry {value}, {top}")
                continue
            if not _valid(value) or not 1 <= len(top) <= count + 1:
                out.append(f"entry {i}: {value}, {top}")
            elif not all(_valid(v) for v in top.values()):
                out.append(f"entry {i}'s top: {top}")
    return out


def merged(text: str, stream: bool) -> dict[str, Any]:
    """The answer's body; a stream's chunks folded into one body per choice."""
    if not stream:
        body: dict[str, Any] = json.loads(text)
        return body
    chunks = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            lp = c["logprobs"]
            if lp is None:  # a chat's role chunk
                continue
            into = choices.setdefault(c["index"], {"index": c["index"], "logprobs": None})
            if into["logprobs"] is None:
                into["logprobs"] = lp
            else:
                for k, v in lp.items():
                    into["logprobs"][k] += v
    return {"choices": [choices[i] for i in sorted(choices)]}


async def test_logprobs_on_real_vllm_and_the_twin(
    real_vllm: Replica, http: aiohttp.ClientSession
) -> None:
    c = REAL_CONFIG
    twin_cfg = ReplicaConfig(
        model=str(real_vllm.model_dir), served_model_name=BASE, max_num_seqs=c.max_num_seqs,
        max_model_len=c.max_model_len, profile="fast", time_scale=10.0,
    )  # fmt: skip
    problems: list[str] = []
    async with run_replica(twin_cfg, host="127.0.0.1", port=0) as twin:
        for path, call in CALLS:
            seen = []
            for who, base in (("real", real_vllm.base_url), ("twin", twin.url)):
                async with http.post(base + path, json=call) as r:
                    text = await r.text()
                    assert r.status == 200, f"{who} {call}: {text}"
                body = merged(text, call.get("stream", False))
                problems += [f"{who} {path} {call}: {p}" for p in problems_of(body, call)]
                seen.append(body)
            real, sim = seen
            if shape(real) != shape(sim):
                problems.append(f"{path} {call}: shape\n  real {shape(real)}\n  twin {shape(sim)}")
            counts = [[len(ch["logprobs"]["content" if "messages" in call else "tokens"])
                       for ch in body["choices"]] for body in seen]  # fmt: skip
            if counts[0] != counts[1]:
                problems.append(f"{path} {call}: entries real {counts[0]} twin {counts[1]}")
        for path, call in PROMPT_ONLY:
            bodies = []
            for base in (real_vllm.base_url, twin.url):
                async with http.post(base + path, json=call) as r:
                    bodies.append(await r.json())
            rows = [b["prompt_logprobs"] if "messages" in call
                    else b["choices"][0]["prompt_logprobs"] for b in bodies]  # fmt: skip
            if shape(bodies[0]) != shape(bodies[1]) or len(rows[0]) != len(rows[1]):
                problems.append(f"{path} {call}: real {bodies[0]}\n  twin {bodies[1]}")
            sizes = [sorted({len(row) for row in x[1:]}) for x in rows]
            want = call.get("prompt_logprobs", 0) + 1
            if any(s_ and s_[-1] > want for s_ in sizes) or rows[1][0] is not None:
                problems.append(f"{path} {call}: rows of sizes {sizes}, at most {want}")
        for path, call in REFUSED:
            answers = []
            for base in (real_vllm.base_url, twin.url):
                async with http.post(base + path, json=call) as r:
                    answers.append((r.status, await r.json()))
            if answers[0] != answers[1]:
                problems.append(f"{path} {call}: real {answers[0]}\n  twin {answers[1]}")
    assert not problems, "\n".join(problems)
