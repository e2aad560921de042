"""A sweep stopped before its end (Ctrl-C, or SIGTERM: ``timeout``, a job runner) prints the
table of the points it had finished, marked as partial, and exits 130 (143 for SIGTERM).
Before, every finished point was lost: a fleet walk-through's sweep stopped by ``timeout``
after 4 of 6 points (hours of simulated traffic) printed nothing (and SIGTERM killed it
outright, exit 124 from ``timeout``)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_spec import SPEC as TINY

from loragate.simulate import sweep
from loragate.simulate.config import SimulationConfig
from loragate.workload import Workload, parse_spec_text

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "workload" / "zipf-200.yaml"


def _ctrl_c_after_the_first(n: int, total: int, point: sweep.Point, elapsed_s: float) -> None:
    raise KeyboardInterrupt  # as if Ctrl-C landed once the first point was done


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_points_hands_over_the_points_done_when_interrupted(jobs: int) -> None:
    workload = Workload(parse_spec_text(TINY))
    base = SimulationConfig(replicas=1)
    points, _ = sweep.grid({"replicas": (1, 2, 3)}, base)
    sims = sweep.prepare(workload, base, points)
    with pytest.raises(sweep.SweepInterrupted) as exc:
        sweep.run_points(sims, points, jobs=jobs, progress=_ctrl_c_after_the_first)
    assert len(exc.value.done) == 1
    ((i, summary),) = exc.value.done
    assert summary["config"]["replicas"] == points[i].replicas


def _sigint_as_by_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigterm_prints_the_finished_points_table(tmp_path: Path) -> None:
    err_path = tmp_path / "stderr.txt"
    argv = ["simulate", "--workload", str(SPEC), "--profile", "llama-3.1-8b-h100",
            "--duration-s", "120", "--sweep", "replicas=1,2,3,4,5,6", "--max-cpu-loras", "32",
            "--jobs", "1", "--progress"]  # fmt: skip
    with err_path.open("w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loragate.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
            preexec_fn=_sigint_as_by_default,
        )
    try:
        deadline = time.monotonic() + 120.0  # the imports and a first point, on a busy machine
        while "[1/6]" not in err_path.read_text() and time.monotonic() < deadline:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)  # still running
        assert "[1/6]" in err_path.read_text(), err_path.read_text()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = err_path.read_text()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    done = re.search(r"interrupted: (\d) of 6 points done, the rest not run", out)
    assert done is not None, out
    n = int(done.group(1))
    assert 1 <= n < 6
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+4\s+32\s", line)]
    assert [int(r[0]) for r in rows] == list(range(1, n + 1))  # replicas 1.. n, in grid order
    assert out.splitlines()[-1].startswith(f"{n} points in ")
    assert err.strip().splitlines()[-2:] == [
        f"loragate simulate: {n} of 6 points done (their table is on stdout)",
        "loragate simulate: interrupted",
    ]
