"""Run-by-run validation: parsing, workload synthesis, end-to-end replay on a tiny subset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from loragate.cli import main as cli_main
from loragate.core.errors import ConfigError
from loragate.twin.real_runs import run_spec_from_row
from loragate.twin.validate import validate
from loragate.twin.validate_lengths import (
    SHAREGPT_OUTPUT_Q,
    SHAREGPT_PCT,
    SHAREGPT_PROMPT_Q,
    LengthModel,
    fit_length_mus,
    sharegpt_pairs,
)
from loragate.twin.validate_workload import ValidateConfig, synthesize_arrivals

FIELDS = [
    "run_id",
    "model",
    "workload",
    "ranks_set",
    "rate_counts",
    "rank_counts",
    "max_loras",
    "max_cpu_loras",
    "max_lora_rank",
    "requests_sent",
    "pool_mean_input_tokens",
    "pool_mean_output_tokens",
    "flag",
    "total_throughput",
    "itl_mean_ms",
    "ttft_mean_ms",
    "ttft_mean_penalised_ms",
    "successful_requests",
]


def _row(
    run_id: str, model: str, *, loras: int, served: int, rates: str, sent: str = "", flag: str = ""
) -> dict[str, str]:
    return {
        "run_id": run_id,
        "model": model,
        "workload": "w",
        "ranks_set": "8 16",
        "rate_counts": rates,
        "rank_counts": f"8:{(served + 1) // 2} 16:{served // 2}",
        "max_loras": str(loras),
        "max_cpu_loras": str(served),
        "max_lora_rank": "16",
        "requests_sent": sent,
        "pool_mean_input_tokens": "223",
        "pool_mean_output_tokens": "196",
        "flag": flag,
        "total_throughput": "800",
        "itl_mean_ms": "17",
        "ttft_mean_ms": "40",
        "ttft_mean_penalised_ms": "45",
        "successful_requests": "100",
    }


def _write_runs(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def runs_csv(tmp_path: Path) -> Path:
    return _write_runs(
        tmp_path / "real_runs.csv",
        [
            _row(
                "llama-3.1-8b-instruct/w/_4_8_16_",
                "llama-3.1-8b-instruct",
                loras=4,
                served=8,
                rates="0.5:4 1:4",
            ),
            _row(
                "qwen-2.5-7b-instruct/w/_8_8_16_",
                "qwen-2.5-7b-instruct",
                loras=8,
                served=8,
                rates="0.5:8",
            ),
            _row(
                "qwen-2.5-7b-instruct/w/_2_4_16_",
                "qwen-2.5-7b-instruct",
                loras=2,
                served=4,
                rates="20:4",
                sent="3000",
            ),
            _row(
                "qwen-2.5-7b-instruct/w/_9_9_16_",
                "qwen-2.5-7b-instruct",
                loras=9,
                served=9,
                rates="1:9",
                flag="served_adapters_mismatch",
            ),
        ],
    )


def test_run_spec_parsing() -> None:
    spec = run_spec_from_row(_row("m/w/_2_5_16_", "m", loras=2, served=5, rates="0.1:2 0.05:3"))
    assert spec.ranks == (8, 16, 8, 16, 8)
    assert sorted(spec.rates_rps) == [0.05, 0.05, 0.05, 0.1, 0.1]
    assert (spec.max_loras, spec.max_cpu_loras, spec.max_lora_rank) == (2, 5, 16)
    assert spec.requests_sent is None


@pytest.mark.parametrize("kind", ["sharegpt", "lognormal"])
def test_length_model_matches_means_and_filter(kind: str) -> None:
    lm = LengthModel(kind=kind)  # type: ignore[arg-type]
    spec = run_spec_from_row(_row("m/w/_8_8_16_", "m", loras=8, served=8, rates="5:8"))
    arr = synthesize_arrivals(spec, ValidateConfig(window_s=600.0, lengths=lm))
    assert arr.prompt.min() >= lm.min_prompt and arr.prompt.max() <= lm.max_prompt
    assert arr.output.min() >= lm.min_output
    assert int((arr.prompt + arr.output).max()) <= lm.max_total
    assert float(arr.prompt.mean()) == pytest.approx(223, rel=0.04)
    assert float(arr.output.mean()) == pytest.approx(196, rel=0.04)
    # heavy tail: the median is well below the mean
    assert float(np.median(arr.prompt)) < 0.85 * float(arr.prompt.mean())
    if kind == "lognormal":
        mu_p, mu_o = fit_length_mus(223.0, 196.0, lm)
        assert mu_p < np.log(223.0) and mu_o < np.log(196.0)


def test_sharegpt_lengths_follow_the_dataset() -> None:
    """The replayed pairs have the dataset's percentiles and its prompt/output anti-correlation."""
    rng = np.random.default_rng(3)
    nan = float("nan")  # no run means: the dataset's own scale
    prompt, output = sharegpt_pairs(rng, 200_000, nan, nan, LengthModel())
    pct = list(SHAREGPT_PCT)
    for q in (10.0, 50.0, 90.0):
        i = pct.index(q)
        assert float(np.percentile(prompt, q)) == pytest.approx(
            SHAREGPT_PROMPT_Q[i], rel=0.05, abs=1.0
        )
        assert float(np.percentile(output, q)) == pytest.approx(
            SHAREGPT_OUTPUT_Q[i], rel=0.05, abs=1.0
        )
    # long prompts come with short answers (ShareGPT: Pearson -0.27)
    assert float(np.corrcoef(prompt, output)[0, 1]) < -0.2
    # the context a running request holds (time-weighted by its output tokens) is what bounds
    # the batch of KV-limited runs: independent lengths with the same means overstate it
    ctx = float(np.sum(output * (prompt + output / 2.0)) / np.sum(output))
    independent = float(np.mean(prompt) + np.sum(output**2) / 2.0 / np.sum(output))
    assert ctx < 0.93 * independent
    # scaled to a run's means
    p2, o2 = sharegpt_pairs(np.random.default_rng(3), 200_000, 250.0, 150.0, LengthModel())
    assert float(p2.mean()) == pytest.approx(250.0, rel=0.01)
    assert float(o2.mean()) == pytest.approx(150.0, rel=0.01)
    assert sharegpt_pairs(rng, 0, 1.0, 1.0, LengthModel())[0].size == 0


def test_requests_sent_scales_the_offered_load() -> None:
    full = run_spec_from_row(_row("m/w/_2_4_16_", "m", loras=2, served=4, rates="20:4"))
    capped = run_spec_from_row(
        _row("m/w/_2_4_16_", "m", loras=2, served=4, rates="20:4", sent="28800")
    )
    cfg = ValidateConfig(window_s=3600.0)
    n_full = synthesize_arrivals(full, cfg).time_s.size
    n_capped = synthesize_arrivals(capped, cfg).time_s.size
    assert n_full == pytest.approx(288000, rel=0.02)
    assert n_capped == pytest.approx(28800, rel=0.03)
    times = synthesize_arrivals(capped, cfg).time_s
    assert bool(np.all(np.diff(times) >= 0))


def test_validate_end_to_end_small_subset(runs_csv: Path) -> None:
    cfg = ValidateConfig(window_s=120.0)
    result = validate(runs_csv, cfg=cfg, jobs=1)
    assert result["runs_replayed"] == 3  # the flagged run is excluded
    assert result["runs_failed"] == []
    runs = {r["run_id"]: r for r in result["runs"]}  # type: ignore[attr-defined]
    light = runs["qwen-2.5-7b-instruct/w/_8_8_16_"]["ours"]
    # light load: every request but the last few finishes; ITL is about one small-batch step
    assert light["successful_requests"] >= 0.9 * light["requests_sent"]
    assert 13.0 < light["itl_mean_ms"] < 25.0
    assert light["ttft_mean_ms"] < 200.0
    heavy = runs["qwen-2.5-7b-instruct/w/_2_4_16_"]["ours"]
    # 3000 requests/h offered over a 120 s window: about 100 arrivals
    assert 60 < heavy["requests_sent"] < 140
    models = {m["model"]: m for m in result["models"]}  # type: ignore[attr-defined]
    assert set(models) == {"llama-3.1-8b-instruct", "qwen-2.5-7b-instruct"}
    assert models["qwen-2.5-7b-instruct"]["n"] == 2
    # deterministic for a seed, different for another seed
    again = validate(runs_csv, cfg=cfg, jobs=1)
    assert [r["ours"] | {"wall_s": 0} for r in again["runs"]] == [  # type: ignore[attr-defined]
        r["ours"] | {"wall_s": 0}
        for r in result["runs"]  # type: ignore[attr-defined]
    ]
    other = validate(runs_csv, cfg=ValidateConfig(window_s=120.0, seed=7), jobs=1)
    assert [r["ours"]["requests_sent"] for r in other["runs"]] != [  # type: ignore[attr-defined]
        r["ours"]["requests_sent"]
        for r in result["runs"]  # type: ignore[attr-defined]
    ]


def test_cli_validate_json(runs_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(
        [
            "twin",
            "validate",
            "--real-runs",
            str(runs_csv),
            "--window-s",
            "60",
            "--jobs",
            "1",
            "--model",
            "qwen-2.5-7b-instruct",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs_replayed"] == 2
    assert out["models"][0]["ours"]["throughput"]["n"] == 2


def test_cli_validate_bad_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["twin", "validate", "--real-runs", str(tmp_path / "none.csv"), "--json"])
    assert code == 2
    err = json.loads(capsys.readouterr().err)
    assert "runs file not found" in err["error"]["message"]


def test_front_end_cap_bounds_the_engine_queue(tmp_path: Path) -> None:
    from dataclasses import replace

    from loragate.twin.profile import dump_profile, load_profile
    from loragate.twin.validate_replay import replay_run

    base = load_profile("qwen-2.5-7b-h100")
    # a steep queue-walk cost makes the engine's queue length visible in the step time
    prof = replace(
        base,
        name="capped",
        scheduler=replace(base.scheduler, max_waiting=50, ms_per_waiting_slots_full=0.05),
    )
    path = tmp_path / "capped.yaml"
    dump_profile(prof, path)
    spec = run_spec_from_row(
        _row(
            "qwen-2.5-7b-instruct/w/_2_8_16_",
            "qwen-2.5-7b-instruct",
            loras=2,
            served=8,
            rates="6:8",
        )
    )
    capped = replay_run(spec, str(path), ValidateConfig(window_s=120.0))
    uncapped = replay_run(spec, str(path), ValidateConfig(window_s=120.0, front_end_cap=False))
    assert capped.requests_sent == uncapped.requests_sent
    assert capped.mean_waiting > 200  # overloaded: a long backlog builds up in both cases
    # the engine only walks (and pays for) the capped queue
    assert capped.itl_mean_ms < uncapped.itl_mean_ms
    assert capped.successful_requests > 0


def test_replays_average_independent_seeds() -> None:
    """--replays K: replay k of K runs with seed seed*K + k and the metrics are their mean, so
    K replays at seed 0 are the single replays at seeds 0..K-1 and seed 1 shares none of them."""
    from dataclasses import replace

    from loragate.twin.validate_replay import replay_run

    spec = run_spec_from_row(
        _row(
            "qwen-2.5-7b-instruct/w/_8_8_16_",
            "qwen-2.5-7b-instruct",
            loras=8,
            served=8,
            rates="2:8",
        )
    )
    one = ValidateConfig(window_s=30.0, replays=1)
    singles = [replay_run(spec, "qwen-2.5-7b-h100", replace(one, seed=k)) for k in range(6)]
    assert len({m.requests_sent for m in singles}) > 1  # the seeds give other realisations
    mean = replay_run(spec, "qwen-2.5-7b-h100", replace(one, replays=3))
    assert mean.replays == 3
    assert mean.replay_itl_ms == tuple(m.itl_mean_ms for m in singles[:3])
    assert mean.itl_mean_ms == pytest.approx(np.mean([m.itl_mean_ms for m in singles[:3]]))
    assert mean.total_throughput == pytest.approx(
        np.mean([m.total_throughput for m in singles[:3]])
    )
    assert mean.requests_sent == round(np.mean([m.requests_sent for m in singles[:3]]))
    other = replay_run(spec, "qwen-2.5-7b-h100", replace(one, replays=3, seed=1))
    assert other.replay_itl_ms == tuple(m.itl_mean_ms for m in singles[3:])
    assert singles[0].replays == 1 and singles[0].replay_itl_ms == ()
    # a replay that measured no ITL (nan) does not blank the others' mean
    from loragate.twin.validate_replay import mean_metrics

    blank = replace(singles[1], itl_mean_ms=float("nan"))
    assert mean_metrics([singles[0], blank]).itl_mean_ms == singles[0].itl_mean_ms


def test_replays_must_be_a_positive_whole_number(runs_csv: Path) -> None:
    with pytest.raises(ConfigError, match="replays"):
        validate(runs_csv, cfg=ValidateConfig(window_s=10.0, replays=0), jobs=1)
