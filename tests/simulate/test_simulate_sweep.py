"""``loragate simulate --sweep``: a grid of deployments on one request stream, one row per
point, and the smallest point meeting the SLO target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loragate.cli import main

REPO = Path(__file__).resolve().parents[2]
# 6 adapters at 40 req/s: with 1-2 LoRA slots the requests wait for slots (fast profile).
TARGET = ["--rate-rps", "40", "--ttft-slo-ms", "50", "--slo-attainment", "0.95"]
GRID = ["--sweep", "replicas=3,1,2", "--sweep", "max_loras=1,2,4"]
AXES = ("replicas", "max_loras", "max_cpu_loras")


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["simulate", *argv, "--json"]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def _untimed(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("wall_s", "speedup")}


def test_every_point_is_the_single_run_with_its_settings(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--workload", str(spec_file), "--policy", "least_loaded", *TARGET]
    result = _json(capsys, *argv, *GRID, "--jobs", "1")
    points = result["points"]
    assert [tuple(p[k] for k in AXES) for p in points] == [
        (r, g, 8) for r in (1, 2, 3) for g in (1, 2, 4)
    ]
    # A single run takes no --slo-attainment (only a sweep has a target to meet).
    single_argv = [a for a in argv if a not in ("--slo-attainment", "0.95")]
    for p in points:
        single = _json(capsys, *single_argv, "--replicas", str(p["replicas"]), "--max-loras",
                       str(p["max_loras"]))  # fmt: skip
        assert _untimed(p["summary"]) == _untimed(single)
        assert p["slo_attainment"] == single["slo"]["attainment"]
        assert p["ttft_p99_ms"] == single["ttft_s"]["p99"] * 1000.0
        assert p["deferred"] == single["deferred"]["requests"]
        assert p["adapter_loads"] == sum(r["adapter_loads"] for r in single["replicas"].values())
        assert p["starved_requests"] == single["starvation"]["requests"]
        assert p["meets"] == (single["slo"]["attainment"] >= 0.95 and not single["starved"])


def test_the_smallest_point_meeting_the_target_is_named(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--workload", str(spec_file), *TARGET, *GRID, "--jobs", "1"]
    result = _json(capsys, *argv)
    meeting = [tuple(p[k] for k in AXES) for p in result["points"] if p["meets"]]
    missing = [tuple(p[k] for k in AXES) for p in result["points"] if not p["meets"]]
    assert meeting and missing  # the target splits this grid
    best = min(meeting)  # fewest replicas, then slots, then CPU cache
    assert tuple(result["sweep"]["smallest"][k] for k in AXES) == best
    assert best != (1, 1, 8)  # not merely the first point
    assert main(["simulate", *argv]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == (
        "target: first token within 50 ms for >= 95.0% of requests, throughput not starved"
    )
    assert out[2].split() == [
        "replicas", "max_loras", "max_cpu_loras", "TTFT", "p50", "ms", "TTFT", "p99", "ms",
        "SLO", "met", "deferred", "slot", "wait", "loads", "starved", "tput", "starved",
        "meets", "SLO",
    ]  # fmt: skip
    assert len(out) == 3 + 9 + 2
    row = next(p for p in result["points"] if tuple(p[k] for k in AXES) == best)
    r, g, c = best
    assert out[-2] == (
        f"smallest meeting the target: {r} replica{'s' if r > 1 else ''}, max_loras {g}, "
        f"max_cpu_loras {c} (TTFT p99 {row['ttft_p99_ms']:.0f} ms, "
        f"{row['slo_attainment']:.1%} within 50 ms)"
    )


def test_no_point_meeting_the_target_says_what_to_sweep_next(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--workload", str(spec_file), *TARGET, "--sweep", "replicas=1,2", "--max-loras", "1"]
    assert main(["simulate", *argv, "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "smallest meeting" not in out
    assert (
        "no point meets the target; the best, 2 replicas, max_loras 1, max_cpu_loras 8, serves "
    ) in out
    assert "its first tokens wait mostly for LoRA slots: sweep higher max_loras" in out


def test_the_result_does_not_depend_on_the_workers(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--workload", str(spec_file), *TARGET, *GRID]
    serial = _json(capsys, *argv, "--jobs", "1")
    done = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "simulate", *argv, "--jobs", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    pooled = json.loads(done.stdout)
    assert pooled["sweep"]["smallest"] == serial["sweep"]["smallest"]
    for a, b in zip(pooled["points"], serial["points"], strict=True):
        assert _untimed(a.pop("summary")) == _untimed(b.pop("summary"))
        assert a == b


def test_combinations_vllm_refuses_are_left_out(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--workload", str(spec_file), "--replicas", "1", "--sweep", "max_loras=4,16",
            "--sweep", "max_cpu_loras=8,16", "--jobs", "1"]  # fmt: skip
    result = _json(capsys, *argv)
    assert [tuple(p[k] for k in AXES) for p in result["points"]] == [
        (1, 4, 8), (1, 4, 16), (1, 16, 16),
    ]  # fmt: skip
    assert result["sweep"]["left_out"] == 1
    assert main(["simulate", *argv]) == 0
    assert (
        "left out 1 points with max_cpu_loras < max_loras (vLLM refuses them)"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--sweep", "replicas"], "--sweep: expected NAME=V1,V2,... with NAME one of replicas, "),
        (["--sweep", "max_num_seqs=1,2"], "--sweep: expected NAME=V1,V2,..."),
        (["--sweep", "replicas=1,x"], "--sweep: replicas: expected integers separated by commas"),
        (["--sweep", "replicas=0,1"], "--sweep: replicas: every value must be >= 1"),
        (["--sweep", "replicas=1,1"], "--sweep: replicas: a value is given twice"),
        (["--sweep", "replicas=1", "--sweep", "replicas=2"], "--sweep: replicas is given twice"),
        (
            [
                "--sweep",
                f"replicas={','.join(map(str, range(1, 17)))}",
                "--sweep",
                "max_loras=1,2,3,4,5",
            ],
            "--sweep: 80 points, more than a sweep may run (64)",
        ),
        (["--sweep", "replicas=1,2", "--replicas", "2"], "--replicas: not used with --sweep"),
        (["--sweep", "replicas=1", "--out", "x"], "--out: not used with --sweep"),
        (["--sweep", "replicas=1", "--slo-attainment", "0"], "--slo-attainment: must be in (0, 1]"),
        (["--sweep", "replicas=1", "--jobs", "-1"], "--jobs: must be >= 0, got -1"),
        (["--sweep", "max_loras=4"], "--replicas: required: how many replicas to simulate"),
        (
            ["--sweep", "replicas=1", "--sweep", "max_loras=16,32"],
            "--sweep: every point has max_cpu_loras < max_loras, which vLLM refuses",
        ),
        (
            [
                "--sweep",
                "replicas=1",
                "--sweep",
                "max_loras=2,8",
                "--max-cpu-loras",
                "8",
                "--max-model-len",
                "65536",
                "--kv-capacity-tokens",
                "32768",
            ],
            "--sweep at 1 replica, max_loras 2, max_cpu_loras 8: --max-model-len: 65536 tokens "
            "do not fit",
        ),
    ],
)
def test_a_bad_sweep_is_one_clear_error(
    spec_file: Path, extra: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--workload", str(spec_file), *extra]) == 2
    got = capsys.readouterr()
    assert got.out == ""
    assert got.err.startswith("loragate simulate: error: ")
    assert fragment in got.err
    assert got.err.count("\n") == 1


def test_a_single_run_without_replicas_says_so(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--workload", str(spec_file)]) == 2
    assert capsys.readouterr().err == (
        "loragate simulate: error: --replicas: required: how many replicas to simulate (or "
        "--sweep replicas=N1,N2,...)\n"
    )


def _sigint_as_by_default() -> None:
    """A job runner may start us with SIGINT ignored, which a child inherits: give the child
    the default, as a terminal does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_sweep_and_its_workers(tmp_path: Path) -> None:
    err_path = tmp_path / "stderr.txt"
    # 32 points of 5 simulated minutes at 50 req/s: minutes of work, far past the hang guard.
    argv = ["simulate", "--workload", str(REPO / "workload" / "zipf-200.yaml"), "--profile",
            "llama-3.1-8b-h100", "--duration-s", "300", "--sweep",
            f"replicas={','.join(map(str, range(1, 17)))}", "--sweep", "max_loras=8,16",
            "--max-cpu-loras", "32", "--jobs", "2", "--progress"]  # fmt: skip
    with err_path.open("w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loragate.cli", *argv],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,  # its own process group, the workers in it: a terminal's
            preexec_fn=_sigint_as_by_default,
        )
    try:
        deadline = time.monotonic() + 120.0  # the imports and a first point, on a busy machine
        while "[1/32]" not in err_path.read_text() and time.monotonic() < deadline:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)  # still running
        assert "[1/32]" in err_path.read_text(), err_path.read_text()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the command and its workers
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err_path.read_text()
    assert code == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1] == "loragate simulate: interrupted"
    assert "[32/32]" not in err
    with pytest.raises(ProcessLookupError):  # no worker left running in the group
        os.killpg(proc.pid, 0)
