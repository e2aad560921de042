"""``bench/validate_twin.py`` takes its inputs as ``loragate twin validate`` does: the paper
twin's runs next to ``--real-runs``, and bad input as one line and exit 2 before any run
(it printed ConfigError tracebacks, and from a clone not beside ../shared it could not start)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import validate_twin  # noqa: E402

RUN_ID = "llama-3.1-8b-instruct/w/_4_8_16_"
REAL = {
    "run_id": RUN_ID, "model": "llama-3.1-8b-instruct", "rate_counts": "1:8",
    "rank_counts": "8:4 16:4", "ranks_set": "8 16", "max_loras": "4", "max_cpu_loras": "8",
    "max_lora_rank": "16", "total_throughput": "800", "itl_mean_ms": "17", "ttft_mean_ms": "40",
    "ttft_mean_penalised_ms": "45", "successful_requests": "100",
}  # fmt: skip
PAPER = {"run_id": RUN_ID, "total_throughput": "790", "itl_mean_ms": "18",
         "ttft_mean_penalised_ms": "50"}  # fmt: skip


def _csv(path: Path, row: dict[str, str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    return path


def test_paper_runs_default_to_the_file_next_to_real_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _csv(tmp_path / "real_runs.csv", REAL)
    _csv(tmp_path / "paper_twin_runs.csv", PAPER)
    out = tmp_path / "result.json"
    args = ["--real-runs", str(real), "--jobs", "1", "--out", str(out)]
    assert validate_twin.main(args) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["paper"] == {"total_throughput": 790.0, "itl_mean_ms": 18.0,
                            "ttft_mean_penalised_ms": 50.0}  # fmt: skip
    assert "paper" in capsys.readouterr().out  # the table's paper-twin rows


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--real-runs", "REAL", "--out", "TMP/no/such/dir/r.json"], "no directory TMP/no/such"),
        (["--real-runs", "REAL", "--replays", "0"], "whole number of replays >= 1"),
        (["--real-runs", "TMP/none.csv"], "TMP/none.csv"),
        (["--real-runs", "REAL", "--paper-runs", "TMP/none.csv"], "TMP/none.csv"),
        (["--real-runs", "REAL", "--model", "nosuch"], "no run to replay"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _csv(tmp_path / "real_runs.csv", REAL)
    args = [a.replace("REAL", str(real)).replace("TMP", str(tmp_path)) for a in args]
    assert validate_twin.main([*args, "--jobs", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # stopped before any run's table
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("validate_twin.py: error: ")
    assert message.replace("TMP", str(tmp_path)) in lines[0]


def test_from_a_clone_without_the_data_set_beside_it(tmp_path: Path) -> None:
    """The default --real-runs is ../shared beside the clone: without it, one line naming the
    missing file and the flag, not a traceback."""
    script = tmp_path / "clone" / "bench" / "validate_twin.py"
    script.parent.mkdir(parents=True)
    shutil.copy(BENCH / "validate_twin.py", script)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(tmp_path / "shared" / "data") in lines[0]
    assert "pass --real-runs FILE" in lines[0]
