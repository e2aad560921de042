"""`loragate demo` end to end: replicas + gateway + load on loopback, as a user runs it."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_demo_runs_and_reports_every_request() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loragate.cli",
            "demo",
            "--duration",
            "4",
            "--json",
            "--no-progress",
            "--replicas",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["requests"] > 10
    assert summary["errors"] == 0
    assert summary["succeeded"] == summary["requests"]
    assert summary["ttft_p50_ms"] <= summary["latency_p50_ms"]
    replicas = summary["replicas"]
    assert [r["replica"] for r in replicas] == ["r0", "r1"]
    # Every successful request was served by one of the replicas.
    assert sum(r["requests"] for r in replicas) == summary["succeeded"]
    # More adapters than GPU slots: the gateway had to load adapters through the admin API.
    assert sum(r["adapter_loads"] for r in replicas) >= 2


def test_demo_rejects_bad_duration() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "demo", "--duration", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "--duration must be > 0" in proc.stderr


REPO = Path(__file__).resolve().parents[1]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loragate.cli", "demo", "--duration", "2", "--no-progress",
         "--replicas", "1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("policy_file", "text", "name"),
    [
        ("examples/policies/composed_affinity.yaml", None, "affinity-plus-ttft"),
        ("least.yaml", "routing: least_loaded\n", "least_loaded"),  # a name in a file
    ],
)
def test_demo_takes_a_policy_file_as_simulate_does(
    tmp_path: Path, policy_file: str, text: str | None, name: str
) -> None:
    """The README's examples/policies/ files work with `loragate simulate --policy FILE`; the
    demo said "unknown policy 'examples/policies/composed_affinity.yaml'"."""
    if text is not None:
        (tmp_path / policy_file).write_text(text)
        policy_file = str(tmp_path / policy_file)
    proc = _demo("--policy", policy_file, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["policy"] == name  # the file's policy routed the requests
    assert summary["requests"] > 0 and summary["errors"] == 0


def test_a_bad_policy_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing:\n  filters: [no_such_filter]\n")
    proc = _demo("--policy", str(bad))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("loragate demo: ")
    assert "'no_such_filter'" in lines[0]
    unreadable = _demo("--policy", str(tmp_path / "missing.yaml"))
    assert unreadable.returncode == 2
    assert unreadable.stderr.startswith(
        f"loragate demo: policy: cannot read policy file {tmp_path / 'missing.yaml'}: "
    )


def test_a_workload_error_in_the_demo_names_file_line_and_key(tmp_path: Path) -> None:
    spec = tmp_path / "w.yaml"
    spec.write_text(
        "duration_s: 5\nadapters: {count: 2}\narrivals:\n  process: gamma\n  cv: high\n"
        "  rate_rps: 2\n"
    )
    proc = _demo("--workload", str(spec))
    assert proc.returncode == 2
    assert proc.stderr == f"loragate demo: {spec}:5:3: arrivals.cv: expected a number, got 'high'\n"


SERVEGEN_HEADER = "client_id,window_start_s,rate_rps,iat_cv,iat_dist,dist_param1,dist_param2\n"


def _small_traces(root: Path) -> Path:
    """A --traces-dir with small copies of the two traces workload/servegen.yaml reads: 64
    ServeGen clients busy in trace hour 24, and conversation lengths whose prompts mostly reach
    the spec's max_total_tokens (4096: a 4095-word prompt, then 1 output token)."""
    servegen = root / "shared/traces/servegen-alibaba-2025"
    servegen.mkdir(parents=True)
    rows = [SERVEGEN_HEADER]
    for cid in range(64):
        rows += [f"{cid},{86400 + w * 600},0.8,1.0,Gamma,1.0,1.25\n" for w in range(2)]
    with gzip.open(servegen / "language_m-large_client_windows.csv.gz", "wt") as fh:
        fh.writelines(rows)
    azure = root / "shared/traces/azure-llm-2023"
    azure.mkdir(parents=True)
    pairs = [(5000, 3), (4500, 8), (4400, 5), (200, 16)]
    (azure / "AzureLLMInferenceTrace_conv.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"2023-11-16 18:15:46.{i:07d},{p},{o}\n" for i, (p, o) in enumerate(pairs))
    )
    return root


def test_the_servegen_demo_serves_prompts_as_long_as_the_spec_allows(tmp_path: Path) -> None:
    """README's `loragate demo --workload workload/servegen.yaml --traces-dir DIR` (here with
    small traces): a 4095-word prompt sent as a chat is 4098 tokens, which replicas with vLLM's
    default context (4096) refused (400, "maximum context length is 4096 tokens"), exit 1.
    The demo's replicas now get the context the workload's longest request needs."""
    traces = _small_traces(tmp_path / "traces")
    proc = _demo("--workload", "workload/servegen.yaml", "--traces-dir", str(traces), "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["requests"] > 10 and summary["errors"] == 0, summary["error_samples"]
    assert summary["succeeded"] == summary["requests"]
    # The longest request: 4095 prompt words + 1 output token, plus a chat's 3 template tokens.
    assert summary["max_model_len"] == 4096 + 3
