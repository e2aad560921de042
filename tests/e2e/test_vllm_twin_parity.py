"""Our simulated replica (``loragate.twin.server``) and real vLLM answer the same sequence of API
calls with the same status codes, the same body shapes (keys and JSON types, recursively) and,
where VLLM_API.md records them, the same messages. Every mismatch is listed in one failure."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from vllm_e2e import BASE, REAL_CONFIG

from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from vllm_cpu.replica import Replica

pytestmark = pytest.mark.vllm

# Fields whose values legitimately differ between the two servers (ids, clocks, paths, text).
VOLATILE = {"id", "created", "text", "content", "system_fingerprint", "root"}
# Differences seen on 2026-11-27 and reported to the twin's owner. While one of them is the ONLY
# difference left the test xfails (visibly), naming it; any other difference fails the test.
# Remove an entry once the twin is fixed.
KNOWN_DIFFS: set[str] = set()


def shape(obj: Any) -> Any:
    """Keys and JSON types, recursively (lists by their first element)."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(obj[0])] if obj else []
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "bool"
    if isinstance(obj, int | float):
        return "number"
    return "string"


@dataclass(frozen=True, kw_only=True)
class Answer:
    status: int
    content_type: str
    text: str
    events: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.text)


async def call(
    http: aiohttp.ClientSession, base: str, method: str, path: str, body: dict[str, Any] | None
) -> Answer:
    async with http.request(method, base + path, json=body) as r:
        text = await r.text()
        events = [ln[5:].strip() for ln in text.splitlines() if ln.startswith("data:")]
        return Answer(
            status=r.status,
            content_type=r.content_type,
            text=text,
            events=events if r.content_type == "text/event-stream" else [],
        )


def compare(label: str, real: Answer, twin: Answer, *, exact_message: bool) -> list[str]:
    out: list[str] = []
    if real.status != twin.status:
        return [f"{label}: status real {real.status} vs twin {twin.status} ({twin.text[:200]})"]
    if real.events:
        if not twin.events:
            return [f"{label}: real streams SSE, twin answered {twin.content_type}"]
        if real.events[-1] != twin.events[-1]:
            out.append(f"{label}: last event {real.events[-1]!r} vs {twin.events[-1]!r}")
        r_chunks = [json.loads(e) for e in real.events if e != "[DONE]"]
        t_chunks = [json.loads(e) for e in twin.events if e != "[DONE]"]
        if len(r_chunks) != len(t_chunks):
            out.append(f"{label}: {len(r_chunks)} real chunks vs {len(t_chunks)} twin chunks")
        for i in (0, len(r_chunks) // 2, -2, -1):
            if i < len(t_chunks) and shape(r_chunks[i]) != shape(t_chunks[i]):
                out.append(
                    f"{label}: chunk {i} shape\n  real {shape(r_chunks[i])}\n"
                    f"  twin {shape(t_chunks[i])}"
                )
        return out
    try:
        rj = real.json()
    except json.JSONDecodeError:
        if real.text != twin.text:
            out.append(f"{label}: text {real.text!r} vs {twin.text!r}")
        return out
    try:
        tj = twin.json()
    except json.JSONDecodeError:
        return [f"{label}: real answered JSON, twin {twin.text[:200]!r}"]
    if shape(rj) != shape(tj):
        out.append(f"{label}: body shape\n  real {shape(rj)}\n  twin {shape(tj)}")
    if isinstance(rj, dict) and "error" in rj and isinstance(tj, dict) and "error" in tj:
        for key in ("type", "param", "code") + (("message",) if exact_message else ()):
            if rj["error"].get(key) != tj["error"].get(key):
                out.append(
                    f"{label}: error.{key} {rj['error'].get(key)!r} vs {tj['error'].get(key)!r}"
                )
    return out


def script(name: str, r8: str, missing_dir: str, r32: str) -> list[tuple[str, str, str, Any, bool]]:
    """(label, method, path, body, compare error messages exactly) in order."""
    load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
    comp = {"prompt": "hello world the", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    chat = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
    }
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    return [
        ("models", "GET", "/v1/models", None, True),
        ("load", "POST", load, {"lora_name": name, "lora_path": r8}, True),
        ("load duplicate", "POST", load, {"lora_name": name, "lora_path": r8}, True),
        (
            "load inplace",
            "POST",
            load,
            {"lora_name": name, "lora_path": r8, "load_inplace": True},
            True,
        ),
        (
            "load missing dir",
            "POST",
            load,
            {"lora_name": name + "-x", "lora_path": missing_dir},
            True,
        ),
        ("load base name", "POST", load, {"lora_name": BASE, "lora_path": r8}, True),
        ("load rank too high", "POST", load, {"lora_name": name + "-r", "lora_path": r32}, True),
        (
            "load a file",
            "POST",
            load,
            {"lora_name": name + "-f", "lora_path": r32 + "/x.json"},
            True,
        ),
        ("load no path", "POST", load, {"lora_name": name + "-y"}, False),
        ("load empty path", "POST", load, {"lora_name": name + "-z", "lora_path": ""}, True),
        ("unload unknown", "POST", unload, {"lora_name": name + "-never"}, True),
        ("models after load", "GET", "/v1/models", None, True),
        ("completion", "POST", "/v1/completions", {"model": name, **comp}, True),
        ("completion stream", "POST", "/v1/completions", {"model": name, **comp, **usage}, True),
        ("completion no model", "POST", "/v1/completions", comp, True),
        ("chat", "POST", "/v1/chat/completions", {"model": name, **chat}, True),
        ("tokenize", "POST", "/tokenize", {"model": name, "prompt": comp["prompt"]}, True),
        ("tokenize chat", "POST", "/tokenize", {"model": name, "messages": chat["messages"]}, True),
        (
            "tokenize token strings",
            "POST",
            "/tokenize",
            {"prompt": "hello world", "add_special_tokens": False, "return_token_strs": True},
            True,
        ),
        ("tokenize no prompt", "POST", "/tokenize", {"model": BASE}, True),
        ("tokenize unknown model", "POST", "/tokenize", {"model": "nope-x", "prompt": "x"}, True),
        ("detokenize", "POST", "/detokenize", {"model": name, "tokens": [100, 200, 5000]}, True),
        ("detokenize negative id", "POST", "/detokenize", {"tokens": [-1]}, True),
        (
            "chat stream",
            "POST",
            "/v1/chat/completions",
            {"model": name, **chat, "stream": True},
            True,
        ),
        ("unknown model", "POST", "/v1/completions", {"model": "nope-x", **comp}, True),
        (
            "unknown model stream",
            "POST",
            "/v1/completions",
            {"model": "nope-x", **comp, "stream": True},
            True,
        ),
        ("chat unknown model", "POST", "/v1/chat/completions", {"model": "nope-x", **chat}, True),
        ("unload", "POST", unload, {"lora_name": name}, True),
        ("completion after unload", "POST", "/v1/completions", {"model": name, **comp}, True),
        ("tokenize after unload", "POST", "/tokenize", {"model": name, "prompt": "x"}, True),
        ("health", "GET", "/health", None, True),
        ("version", "GET", "/version", None, True),
        ("load endpoint", "GET", "/load", None, True),
    ]


def _rank_32(lora_paths: dict[int, list[str]], tmp_path: Path) -> str:
    """A copy of a rank-16 adapter whose config says r=32 (above max_lora_rank 16), and a file
    in it (``x.json``) to give as a folder."""
    folder = tmp_path / "r32"
    shutil.copytree(lora_paths[16][0], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 32}))
    (folder / "x.json").write_text("{}")
    return str(folder)


async def test_twin_and_real_vllm_answer_the_same_api_calls(
    real_vllm: Replica,
    http: aiohttp.ClientSession,
    lora_paths: dict[int, list[str]],
    unique_name: str,
    tmp_path: Path,
) -> None:
    c = REAL_CONFIG
    twin_cfg = ReplicaConfig(
        model=str(real_vllm.model_dir),
        served_model_name=BASE,
        enable_lora=True,
        max_loras=c.max_loras,
        max_cpu_loras=c.max_cpu_loras,
        max_lora_rank=c.max_lora_rank,
        max_num_seqs=c.max_num_seqs,
        max_num_batched_tokens=c.max_num_batched_tokens,
        max_model_len=c.max_model_len,
        profile="fast",
        time_scale=10.0,
    )
    problems: list[str] = []
    async with run_replica(twin_cfg, host="127.0.0.1", port=0) as twin:
        for label, method, path, body, exact in script(
            unique_name, lora_paths[8][0], str(tmp_path / "missing"), _rank_32(lora_paths, tmp_path)
        ):
            real = await call(http, real_vllm.base_url, method, path, body)
            sim = await call(http, twin.url, method, path, body)
            problems += compare(label, real, sim, exact_message=exact)
    unknown = [p for p in problems if p.split("\n")[0] not in KNOWN_DIFFS]
    assert not unknown, "twin differs from real vLLM:\n" + "\n".join(problems)
    if problems:
        pytest.xfail(
            "known twin/vLLM differences: " + "; ".join(p.split("\n")[0] for p in problems)
        )


def test_shape_ignores_values_but_not_keys() -> None:
    assert shape({"a": 1, "b": [{"c": None}]}) == shape({"a": 2.5, "b": [{"c": None}]})
    assert shape({"a": 1}) != shape({"a": 1, "b": 2})
    assert shape({"a": "x"}) != shape({"a": 1})
    assert VOLATILE  # documented: values of these fields are never compared


def _merged_from(merged: list[Any], each: list[Any]) -> bool:
    """``merged`` is ``each`` with some items left out, the rest in order (a subsequence)."""
    rest = iter(each)
    return all(any(item == other for other in rest) for item in merged)


def test_merged_from() -> None:
    assert _merged_from([2, 3, 4], [1, 2, 3, 4]) and _merged_from([1, 2, 3], [1, 2, 3])
    assert not _merged_from([3, 2], [1, 2, 3]) and not _merged_from([1, 2, 3], [1, 3])


async def test_continuous_usage_stats_on_real_vllm_and_the_twin(
    real_vllm: Replica, http: aiohttp.ClientSession
) -> None:
    """``stream_options: {include_usage, continuous_usage_stats}``: every chunk carries its
    choice's running usage (chat's with ``completion_tokens_details``), after ``choices``.

    The twin streams one chunk per token, as vLLM does when its API server keeps up. A loaded
    vLLM merges the deltas of engine steps not read yet into one chunk (vllm/v1/engine/
    output_processor.py RequestOutputCollector.put -> vllm/outputs.py RequestOutput.add), whose
    running usage is the latest step's: it skips the usages in between. So, taking each chunk
    as its keys in order and its usage: real vLLM's chunks are the twin's with some left out (a
    subsequence), the last chunk (final usage) the same, and the twin's text chunks count the
    tokens one by one (chat's from its role chunk's 0)."""
    c = REAL_CONFIG
    twin_cfg = ReplicaConfig(
        model=str(real_vllm.model_dir), served_model_name=BASE, max_num_seqs=c.max_num_seqs,
        max_model_len=c.max_model_len, profile="fast", time_scale=10.0,
    )  # fmt: skip
    options = {"include_usage": True, "continuous_usage_stats": True}
    max_tokens = 3
    common = {"model": BASE, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
              "stream": True, "stream_options": options}  # fmt: skip
    calls = [
        ("/v1/completions", {**common, "prompt": "Hello world the adapter"}),
        ("/v1/completions", {**common, "prompt": "Hello world the adapter", "echo": True}),
        ("/v1/chat/completions", {**common, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {**common, "prompt": "hi", "stream_options": {
            "include_usage": False, "continuous_usage_stats": True}}),
    ]  # fmt: skip
    problems: list[str] = []
    async with run_replica(twin_cfg, host="127.0.0.1", port=0) as twin:
        for path, body in calls:
            seen = []
            for base in (real_vllm.base_url, twin.url):
                answer = await call(http, base, "POST", path, body)
                chunks = [json.loads(e) for e in answer.events if e != "[DONE]"]
                seen.append([(list(chunk), chunk.get("usage")) for chunk in chunks])
            real, twin_seen = seen
            twin_chunks = chunks  # the last answer read
            counts = [
                usage["completion_tokens"]
                for chunk in twin_chunks
                if chunk["choices"] and (usage := chunk.get("usage"))
            ]
            if not (real and real[-1] == twin_seen[-1] and _merged_from(real, twin_seen)):
                problems.append(f"{path} {body}:\n  real {real}\n  twin {twin_seen}")
            elif counts and counts != list(range(0 if "chat" in path else 1, max_tokens + 1)):
                problems.append(f"{path} {body}: twin's completion_tokens {counts}, not one by one")
    assert not problems, "twin differs from real vLLM:\n" + "\n".join(problems)
