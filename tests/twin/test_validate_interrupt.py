"""Ctrl-C in `loragate twin validate --jobs N`: the queued runs are cancelled, the workers
stopped, one line, exit 130 (as `loragate simulate`)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUNS = 400  # ~0.8 CPU s each: running them all would take minutes, far past the hang guard


def _runs_csv(path: Path) -> Path:
    fields = ["run_id", "model", "rate_counts", "rank_counts", "ranks_set", "max_loras",
              "max_cpu_loras", "max_lora_rank", "total_throughput", "itl_mean_ms",
              "ttft_mean_ms", "ttft_mean_penalised_ms", "successful_requests"]  # fmt: skip
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for i in range(RUNS):
            writer.writerow({
                "run_id": f"llama-3.1-8b-instruct/w/_4_8_16_/{i}",
                "model": "llama-3.1-8b-instruct", "rate_counts": "1:8",
                "rank_counts": "8:4 16:4", "ranks_set": "8 16", "max_loras": "4",
                "max_cpu_loras": "8", "max_lora_rank": "16", "total_throughput": "800",
                "itl_mean_ms": "17", "ttft_mean_ms": "40", "ttft_mean_penalised_ms": "45",
                "successful_requests": "100",
            })  # fmt: skip
    return path


def _sigint_as_by_default() -> None:
    """A job runner may start us with SIGINT ignored, which a child inherits (and Python then
    installs no KeyboardInterrupt handler): give the child the default, as a terminal does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_cancels_the_queued_runs_and_stops_the_workers(tmp_path: Path) -> None:
    runs = _runs_csv(tmp_path / "real_runs.csv")
    err_path = tmp_path / "stderr.txt"
    out_path = tmp_path / "result.json"
    with err_path.open("w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loragate.cli", "twin", "validate", "--real-runs", str(runs),
             "--jobs", "2", "--progress", "--out", str(out_path)],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,  # its own process group, the workers in it: a terminal's
            preexec_fn=_sigint_as_by_default,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120.0  # the imports and a first run, on a busy machine
        while "[1/" not in err_path.read_text() and time.monotonic() < deadline:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)  # still running
        assert "[1/" in err_path.read_text(), err_path.read_text()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the command and its workers
        code = proc.wait(timeout=60)  # a hang guard: every queued run would take minutes
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err_path.read_text()
    assert code == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1] == "loragate twin validate: interrupted"
    assert all(line.startswith("[") for line in lines[:-1]), err  # progress lines only
    assert len(lines) - 1 < RUNS
    assert not out_path.exists()
    with pytest.raises(ProcessLookupError):  # no worker left running in the group
        os.killpg(proc.pid, 0)
