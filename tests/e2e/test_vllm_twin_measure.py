"""``loragate twin measure --quick`` on real vLLM 0.32 (CPU), then ``twin calibrate`` and
``simulate --profile`` on what it measured: the path a user with their own hardware follows.

The command template starts the env's vLLM as ``vllm_cpu.replica`` does (the server module, the
AMX permission shim on PYTHONPATH, a 64 MiB KV cache); the base server is derived from it
(``--enable-lora`` and the LoRA options taken out). Three servers start one after the other
(~1 min each on a busy 2-core machine), then the quick sweeps (~1-2 min).
"""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest

from loragate.cli import main
from loragate.twin.calibrate import calibrate_profile
from vllm_cpu.replica import AMX_PERMISSION_DIR, SERVED_NAME, adapter_dirs

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]


def _template(work_dir: Path) -> str:
    env = {
        "PYTHONPATH": str(AMX_PERMISSION_DIR),
        "VLLM_CPU_OMP_THREADS_BIND": "1",
        "VLLM_PLUGINS": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    server = [
        str(work_dir / "venv" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(work_dir / "models" / SERVED_NAME), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--dtype", "bfloat16", "--max-model-len", "512",
        "--max-num-batched-tokens", "2048", "--kv-cache-memory-bytes", "64M",
        "--no-enable-prefix-caching", "--enable-server-load-tracking",
        # eager, as vLLM CPU runs any LoRA server: the derived base server runs the same code
        "--compilation-config", '{"mode": 0}',
    ]  # fmt: skip
    placeholders = (
        "--port {port} --max-num-seqs {max_num_seqs} --enable-lora --max-loras {max_loras} "
        "--max-cpu-loras {max_cpu_loras} --max-lora-rank {max_lora_rank}"
    )
    return " ".join(
        [
            "env",
            *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
            shlex.join(server),
            placeholders,
        ]
    )


def test_measure_quick_then_calibrate_then_simulate(
    vllm_work_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dirs = adapter_dirs(vllm_work_dir)
    calib = tmp_path / "calib"
    argv = [
        "twin", "measure", "--quick", "--model", "tiny-llama-measured", "--out", str(calib),
        "--vllm-command", _template(vllm_work_dir),
        "--adapter", str(dirs[8][0]), "--adapter", str(dirs[16][0]),
    ]  # fmt: skip
    code = main(argv)
    measured = capsys.readouterr()
    assert code == 0, measured.err
    assert f"next: loragate twin calibrate --data {calib}" in measured.out
    with (calib / "kv_capacity.csv").open() as f:
        kv = list(csv.DictReader(f))
    # vLLM's log: "CPU KV cache size: 32,768 tokens" for 64 MiB, with and without LoRA
    assert [(r["group"], r["enable_lora"], r["kv_tokens"]) for r in kv] == [
        ("measured_base", "0", "32768"), ("measured_lora_overhead", "1", "32768"),
        ("measured_loading", "1", "32768"),
    ]  # fmt: skip
    assert {r["max_num_batched_tokens"] for r in kv} == {"2048"}
    with (calib / "base_latency.csv").open() as f:
        base = list(csv.DictReader(f))
    # the engine-side columns come from vLLM's own /metrics
    assert all(int(r["n_steps"]) > 0 and float(r["itl_server_mean_ms"] or 0) >= 0 for r in base)

    profile_path = tmp_path / "mine.yaml"
    argv = [
        "twin", "calibrate", "--data", str(calib), "--model", "tiny-llama-measured",
        "--out", str(profile_path), "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    comps = report["components"]
    assert comps["base_decode"]["rows"] >= 4 and comps["lora"]["rows"] >= 3
    assert comps["kv"]["rows"] >= 1
    # the prefill weight from its own full-chunk rows (needs vLLM's engine-step counters), not
    # the fallback "no prefill data"
    assert comps["prefill"]["note"].endswith("prefill rows of tiny-llama-measured")
    profile, _ = calibrate_profile(str(calib), "tiny-llama-measured", name="mine")
    assert profile.kv.kv0_tokens == 32768
    # LoRA costs time on this CPU (x2-3 per step): some LoRA term is fitted above 0 (which one
    # takes it varies with the noise of a one-repetition plan on a shared machine)
    lora = profile.lora
    assert lora.extra_intercept_ms + lora.extra_ms_per_token + lora.extra_ms_per_adapter > 0

    out = tmp_path / "sim"
    argv = [
        "simulate", "--workload", str(REPO / "workload" / "demo.yaml"), "--replicas", "2",
        "--profile", str(profile_path), "--duration-s", "30", "--max-model-len", "512",
        "--json", "--out", str(out),
    ]  # fmt: skip
    code = main(argv)
    simulated = capsys.readouterr()
    assert code == 0, simulated.err
    result = json.loads(simulated.out)
    assert result["config"]["profile"] == "mine"
    assert result["config"]["engine"]["kv_capacity_tokens"] == 32768  # the measured KV
    assert result["requests"]["ok"] == result["requests"]["total"] > 0
