"""The offered rate of a run that ``--max-requests`` cuts: measured over the span that holds
exactly the requests taken (up to the first arrival left out), and ``n/a`` when that span is
too short to be a rate (the first arrivals of a bursty trace fall within microseconds).

The target is one simulated vLLM replica on loopback; the workload's arrival times are read from
the same spec the command replays (its stream is deterministic).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from loragate.cli import main
from loragate.workload import Workload, load_spec

BASE = "tiny-llama"


def spec_file(tmp_path: Path, *, rate_rps: float, duration_s: float, seed: int = 3) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"name: rate\nseed: {seed}\nduration_s: {duration_s}\nadapters: {{count: 1}}\n"
        f"arrivals: {{process: poisson, rate_rps: {rate_rps}}}\n"
        "lengths: {prompt: 8, output: 2}\n",
        encoding="utf-8",
    )
    return path


def arrivals(spec: Path) -> list[float]:
    return [r.t_s for r in Workload(load_spec(spec)).requests()]


async def loadtest(url: str, spec: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    """``loragate loadtest`` from a worker thread (every request to the base model); its exit
    status and JSON summary."""
    out = spec.parent / "summary.json"
    code = await asyncio.to_thread(
        main,
        ["loadtest", "--progress-s", "0", "--url", url, "--workload", str(spec),
         "--json", str(out), "--base-only", *argv],
    )  # fmt: skip
    return code, json.loads(out.read_text(encoding="utf-8"))


async def test_a_burst_cut_by_max_requests_has_no_rate_and_says_why(
    replica_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 100,000 req/s: the first 3 arrivals fall within ~30 microseconds.
    spec = spec_file(tmp_path, rate_rps=100_000, duration_s=1)
    first = arrivals(spec)[:4]
    assert first[3] < 0.01  # the premise: a burst, far below a second
    code, summary = await loadtest(replica_url, spec, "--max-requests", "3")
    out = capsys.readouterr().out
    assert code == 0
    rate = summary["rate"]
    assert summary["requests"]["sent"] == summary["requests"]["ok"] == 3
    assert rate["offered_rps"] is None
    assert rate["sent_rps"] is None
    assert "3 requests arrived within" in rate["not_measured"]
    assert "a rate needs 1 s of arrivals or more" in rate["not_measured"]
    assert rate["ok_rps"] is not None  # answers over the run's wall-clock time: a real figure
    line = next(x for x in out.splitlines() if x.startswith("rate"))
    assert line.startswith("rate      offered n/a (3 requests arrived within ")
    assert "spec mean 100000.00" in line
    assert "sent n/a" in line
    assert "over 0.0 s" not in line


async def test_a_cut_run_is_measured_up_to_the_first_arrival_left_out(
    replica_url: str, tmp_path: Path
) -> None:
    spec = spec_file(tmp_path, rate_rps=4, duration_s=30)
    times = arrivals(spec)
    assert times[6] >= 1.0  # the premise: the 6 requests taken span over a second
    code, summary = await loadtest(replica_url, spec, "--max-requests", "6")
    assert code == 0
    rate = summary["rate"]
    # 6 requests arrived in [0, t7): that window, not [0, t6] (which ends on an arrival)
    assert rate["window_s"] == pytest.approx(times[6], rel=1e-5)
    assert rate["offered_rps"] == round(6 / times[6], 4)
    assert rate["not_measured"] is None


async def test_max_requests_above_what_the_spec_holds_keeps_the_specs_window(
    replica_url: str, tmp_path: Path
) -> None:
    spec = spec_file(tmp_path, rate_rps=3, duration_s=2, seed=11)
    n = len(arrivals(spec))
    assert n >= 2
    code, summary = await loadtest(replica_url, spec, "--max-requests", str(n))
    assert code == 0
    assert summary["requests"]["sent"] == n
    # every arrival of the spec's 2 s was taken: nothing was cut, the window is the duration
    assert summary["rate"]["window_s"] == 2.0
    assert summary["rate"]["offered_rps"] == round(n / 2.0, 4)
