"""Exact replay of the real vLLM CPU validation runs (data/tiny-llama-cpu)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from loragate.twin.real_runs import read_rows, run_spec_from_row
from loragate.twin.validate import validate
from loragate.twin.validate_workload import ValidateConfig, exact_arrivals

DATA = Path(__file__).resolve().parents[2] / "data" / "tiny-llama-cpu" / "validation"
RUNS = DATA / "real_runs.csv"
RUN = "v3_heavy_tail_2ad"
WINDOW_S = 12.0


def _row(run_id: str) -> dict[str, str]:
    return next(r for r in read_rows(RUNS) if r["run_id"] == run_id)


def _recorded(run_id: str, window_s: float) -> list[dict[str, str]]:
    with (DATA / "requests.csv").open(newline="") as handle:
        return [
            r
            for r in csv.DictReader(handle)
            if r["run_id"] == run_id and float(r["t_send_offset_s"]) < window_s
        ]


def test_explicit_adapters_and_engine_settings_are_read() -> None:
    spec = run_spec_from_row(_row("v5_skewed_16ad"), RUNS.parent)
    assert len(spec.ranks) == 16 and spec.ranks[:2] == (8, 16)
    assert spec.rates_rps[:3] == (2.0, 2.0, 1.0)
    assert (spec.max_loras, spec.max_cpu_loras, spec.max_lora_rank) == (4, 8, 16)
    assert (spec.max_num_seqs, spec.token_budget, spec.max_model_len) == (32, 2048, 512)
    assert spec.real_window_s == 90.0
    assert not spec.adapters_in_gpu_at_start
    assert Path(spec.requests_path).name == "requests.csv"


def test_exact_arrivals_are_the_recorded_requests() -> None:
    spec = run_spec_from_row(_row(RUN), RUNS.parent)
    arr = exact_arrivals(spec, WINDOW_S)
    rec = _recorded(RUN, WINDOW_S)
    assert arr.time_s.size == len(rec) > 10
    assert sorted(arr.prompt.tolist()) == sorted(int(r["input_tokens"]) for r in rec)
    assert sorted(arr.output.tolist()) == sorted(int(r["output_tokens"]) for r in rec)
    assert sorted(spec.ranks[a] for a in arr.adapter.tolist()) == sorted(
        int(r["adapter_rank"]) for r in rec
    )
    assert (arr.time_s[1:] >= arr.time_s[:-1]).all()


def test_replay_of_one_run_with_a_shortened_window() -> None:
    result = validate(RUNS, run_ids=[RUN], cfg=ValidateConfig(window_s=WINDOW_S), jobs=1)
    assert not result["runs_failed"]
    (run,) = result["runs"]  # type: ignore[misc]
    ours = run["ours"]
    rec = _recorded(RUN, WINDOW_S)
    assert ours["requests_sent"] == len(rec)
    assert 0 < ours["successful_requests"] <= len(rec)
    offered = sum(int(r["input_tokens"]) + int(r["output_tokens"]) for r in rec)
    # throughput counts only completed requests' tokens over the (shortened) window
    assert 0 < ours["total_throughput"] * WINDOW_S <= offered
    assert ours["itl_mean_ms"] > 0 and ours["ttft_mean_ms"] > 0
    (model,) = result["models"]  # type: ignore[misc]
    assert model["model"] == "tiny-llama-cpu" and model["profile"] == "tiny-llama-cpu"
    assert model["ours"]["throughput"]["n"] == 1


def test_missing_requests_file_is_a_clear_error(tmp_path: Path) -> None:
    row = _row(RUN)
    from loragate.core.errors import ConfigError

    with pytest.raises(ConfigError, match="requests file"):
        run_spec_from_row(row, tmp_path)
