"""Record what real vLLM 0.32 says of its LoRA settings: whether ``/metrics`` carries
``vllm:lora_requests_info`` (and its ``max_lora`` label) while idle, after a base-model request
and after an adapter request; and what a server without ``--enable-lora``, or without
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, answers an adapter load (a real adapter, a path that
does not exist, an empty body) and an adapter request. ``bench/vllm_cpu/lora_off_transcript.md``
is this script's output (the gateway's pool and the simulated replica are checked against it)::

    python bench/vllm_cpu/lora_off_probe.py > bench/vllm_cpu/lora_off_transcript.md

Three replicas are started one after the other (tiny-llama): ``lora`` (``--enable-lora
--max-loras 2 --max-cpu-loras 4``, runtime updating on), ``no-lora`` (no ``--enable-lora``,
runtime updating on), ``no-runtime`` (``--enable-lora``, runtime updating off).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_cpu.replica import ReplicaConfig, start_replica, work_dir_from_env

_JSON = "application/json"


def call(base: str, method: str, path: str, body: object = None) -> tuple[int, str, str]:
    """(status, content type, body text) of one request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", _JSON)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def show(base: str, method: str, path: str, body: object = None) -> tuple[int, str]:
    status, ctype, text = call(base, method, path, body)
    print(f"`{method} {path}`" + (f" `{json.dumps(body)}`" if body is not None else ""))
    print(f"-> {status} `{ctype}`\n\n```\n{text.strip()[:1500]}\n```\n")
    return status, text


def lora_lines(base: str, when: str) -> None:
    _, _, text = call(base, "GET", "/metrics")
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info")]
    print(f"`/metrics` {when}: {len(lines)} `vllm:lora_requests_info` series")
    print("\n```\n" + ("\n".join(lines) or "(none)") + "\n```\n")


def probe(name: str, config: ReplicaConfig, adapter: str) -> None:
    work = work_dir_from_env()
    print(f"## {name}\n\n`{' '.join(config.cli_args(Path('M'), 0))}`, runtime updating "
          f"{'on' if config.runtime_lora_updating else 'off'}\n")  # fmt: skip
    rep = start_replica(config, work_dir=work, log_name=f"lora-off-probe-{name}.log")
    try:
        base = rep.base_url
        lora_lines(base, "right after /health 200")
        time.sleep(3.0)
        lora_lines(base, "3 s later, idle")
        show(base, "GET", "/v1/models")
        show(base, "POST", "/v1/completions", {"model": "tiny-llama", "prompt": "hi",
                                               "max_tokens": 2})  # fmt: skip
        lora_lines(base, "after a base-model request")
        show(base, "POST", "/v1/load_lora_adapter", {})
        show(
            base,
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": "probe-missing", "lora_path": "/nonexistent/probe-missing"},
        )
        show(base, "POST", "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": adapter})
        show(base, "POST", "/v1/completions", {"model": "a1", "prompt": "hi", "max_tokens": 2})
        lora_lines(base, "after an adapter load and request")
        show(base, "GET", "/v1/models")
    finally:
        rep.stop()


def main() -> int:
    work = work_dir_from_env()
    adapter = str(work / "loras" / "lora-0")
    common = {"omp_bind": "1", "server_load_tracking": False}
    print("# vLLM 0.32: LoRA settings as the server shows them (lora_off_probe.py)\n")
    probe("lora", ReplicaConfig(max_loras=2, max_cpu_loras=4, **common), adapter)  # type: ignore[arg-type]
    probe("no-lora", ReplicaConfig(enable_lora=False, **common), adapter)  # type: ignore[arg-type]
    probe("no-runtime", ReplicaConfig(runtime_lora_updating=False, **common), adapter)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
