"""Replay real vLLM runs in the twin (virtual time) and compare run by run.

Each row of ``validation/real_runs.csv`` is replayed with the requests it offered
(``validate_workload``: offered load, Poisson arrivals over the served adapters, or the run's
exact requests; lengths from ``validate_lengths``) in an engine set up as the real one and
measured like the benchmark (``validate_replay``). This module replays the whole table (in a
process pool), compares every run with the real one and the paper twin's, and summarises the
errors per model (:func:`validate`).

The runs file is read into runs to replay by :mod:`loragate.twin.real_runs` (rows that cannot
be replayed as they stand are skipped with the reason; model names are matched loosely).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from loragate.core.errors import ConfigError
from loragate.core.process_pool import WorkerPool, stop_pool
from loragate.twin.metrics_errors import ErrorSummary, summarize
from loragate.twin.real_runs import (
    DEFAULT_PROFILES,
    RunSpec,
    canonical_model,
    cell_float,
    cell_text,
    check_columns,
    read_table,
    select_runs,
)
from loragate.twin.validate_replay import RunMetrics, failed_metrics, replay_job
from loragate.twin.validate_workload import OFFERED_LOADS, ValidateConfig

# The paper twin's profiles of the data set's models (ours: real_runs.DEFAULT_PROFILES).
PAPER_PROFILES: dict[str, str] = {
    "llama-3.1-8b-instruct": "paper-llama-3.1-8b-h100",
    "qwen-2.5-7b-instruct": "paper-qwen-2.5-7b-h100",
}


# ---------------------------------------------------------------- the whole table


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    spec: RunSpec
    profile: str
    ours: RunMetrics
    real: dict[str, float]
    paper: dict[str, float] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSummary:
    model: str
    profile: str
    n: int
    ours: dict[str, ErrorSummary]
    paper: dict[str, ErrorSummary]


_REAL_KEYS = (
    "total_throughput",
    "itl_mean_ms",
    "ttft_mean_ms",
    "ttft_mean_penalised_ms",
    "successful_requests",
    "requests_sent",
    "mean_running",
    "mean_waiting",
    "preemptions",
)
_PAPER_KEYS = ("total_throughput", "itl_mean_ms", "ttft_mean_penalised_ms")


def resolve_profiles(models: Sequence[str], profile_for: dict[str, str]) -> dict[str, str]:
    """The profile of each model: ``profile_for[model]`` (any spelling of the model), else
    ``profile_for["*"]``, else the model's default; one clear error for a model without one
    or a profile that does not load."""
    from loragate.twin.profile import list_profiles, load_profile

    given = {canonical_model(k): v for k, v in profile_for.items() if k != "*"}
    out: dict[str, str] = {}
    for model in models:
        ref = given.get(model) or profile_for.get("*") or DEFAULT_PROFILES.get(model)
        if ref is None:
            raise ConfigError(
                f"no profile for model {model!r}: pass --profile '{model}=PROFILE' (a built-in "
                f"profile: {', '.join(list_profiles())}; or a profile YAML file)",
                key="profile",
            )
        out[model] = ref
    for ref in sorted(set(out.values())):
        load_profile(ref)  # an unknown name or a broken file: one error now, not one per run
    return out


def _expected_cost(spec: RunSpec) -> float:
    mean_tokens = spec.mean_prompt_tokens + spec.mean_output_tokens
    return sum(spec.rates_rps) * (mean_tokens if math.isfinite(mean_tokens) else 420.0)


def run_validation(
    specs: Sequence[RunSpec],
    *,
    profile_for: dict[str, str],
    cfg: ValidateConfig,
    jobs: int = 0,
    progress: bool = False,
) -> list[RunMetrics]:
    """Replay ``specs`` (in a process pool when jobs != 1); results in the order of specs.

    ``profile_for`` maps each spec's model to its profile (:func:`resolve_profiles`).
    """
    work = [
        (s, profile_for.get(s.model) or DEFAULT_PROFILES.get(s.model, s.model), cfg) for s in specs
    ]
    workers = jobs if jobs > 0 else (os.cpu_count() or 1)
    out: list[RunMetrics | None] = [None] * len(work)

    def report(done: int, i: int) -> None:
        if progress:
            m = out[i]
            print(
                f"[{done}/{len(work)}] {work[i][0].run_id} cpu {m.wall_s if m else 0:.1f}s"
                + (f" {m.error}" if m and m.error else ""),
                file=sys.stderr,
                flush=True,
            )

    if workers == 1 or len(work) <= 1:
        for i, job in enumerate(work):
            out[i] = replay_job(job)
            report(i + 1, i)
        return [r for r in out if r is not None]
    # Longest runs first so the pool ends evenly.
    order = sorted(range(len(work)), key=lambda i: -_expected_cost(work[i][0]))
    pool = WorkerPool(workers)
    try:
        futures = {pool.submit(replay_job, work[i]): i for i in order}
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            try:
                out[i] = future.result()
            except Exception as exc:  # the worker died (e.g. out of memory)
                out[i] = failed_metrics(f"worker process failed: {type(exc).__name__}: {exc}")
            report(done, i)
    except BaseException:  # Ctrl-C: drop the queued runs and stop the running ones now
        stop_pool(pool)
        raise
    pool.shutdown()
    return [r for r in out if r is not None]


def _row_floats(row: dict[str, str] | None, keys: Sequence[str]) -> dict[str, float]:
    if row is None:
        return {}
    return {k: cell_float(row, k) for k in keys}


def summarize_results(results: Sequence[RunResult]) -> list[ModelSummary]:
    out: list[ModelSummary] = []
    for model in sorted({r.spec.model for r in results}):
        rs = [r for r in results if r.spec.model == model and not r.ours.error]
        both = [r for r in rs if r.paper]
        ours = {
            "throughput": summarize(
                [r.real["total_throughput"] for r in rs], [r.ours.total_throughput for r in rs]
            ),
            "itl": summarize([r.real["itl_mean_ms"] for r in rs], [r.ours.itl_mean_ms for r in rs]),
            "ttft": summarize(
                [r.real["ttft_mean_ms"] for r in rs], [r.ours.ttft_mean_ms for r in rs]
            ),
            "ttft_penalised": summarize(
                [r.real["ttft_mean_penalised_ms"] for r in rs],
                [r.ours.ttft_mean_penalised_ms for r in rs],
            ),
        }
        paper = {
            "throughput": summarize(
                [r.real["total_throughput"] for r in both],
                [(r.paper or {})["total_throughput"] for r in both],
            ),
            "itl": summarize(
                [r.real["itl_mean_ms"] for r in both],
                [(r.paper or {})["itl_mean_ms"] for r in both],
            ),
            "ttft_penalised": summarize(
                [r.real["ttft_mean_penalised_ms"] for r in both],
                [(r.paper or {})["ttft_mean_penalised_ms"] for r in both],
            ),
        }
        profile = next((r.profile for r in results if r.spec.model == model), "")
        out.append(ModelSummary(model=model, profile=profile, n=len(rs), ours=ours, paper=paper))
    return out


def _paper_rows(paper_runs: str | Path | None) -> dict[str, dict[str, str]]:
    if not paper_runs:
        return {}
    table = read_table(paper_runs, key="paper_runs")
    if "run_id" not in table.columns:
        raise ConfigError(
            f"{table.path} has no run_id column (a paper_twin_runs.csv has one)", key="paper_runs"
        )
    return {cell_text(r, "run_id"): r for r in table.rows}


def _count(values: Sequence[str]) -> dict[str, int]:
    return dict(Counter(values).most_common())


def validate(
    real_runs: str | Path,
    *,
    paper_runs: str | Path | None = None,
    profile_for: dict[str, str] | None = None,
    cfg: ValidateConfig | None = None,
    models: Sequence[str] = (),
    run_ids: Sequence[str] = (),
    limit: int | None = None,
    jobs: int = 0,
    progress: bool = False,
) -> dict[str, object]:
    """Replay the runs, compare with the real and the paper twin's, return a JSON-able dict.

    ``profile_for``: model (any spelling) -> profile name or file; ``"*"``: every model.
    Every row of ``real_runs`` is accounted for: replayed (``runs``; those the twin could not
    replay also in ``runs_failed``), skipped with the reason (``runs_skipped``), or left out
    by ``models`` / ``run_ids`` / ``limit`` (``rows_not_selected``).
    """
    cfg = cfg or ValidateConfig()
    if not (math.isfinite(cfg.window_s) and cfg.window_s > 0):
        raise ConfigError(
            f"must be a positive number of seconds (got {cfg.window_s})", key="window_s"
        )
    if isinstance(cfg.replays, bool) or not isinstance(cfg.replays, int) or cfg.replays < 1:
        raise ConfigError(
            f"must be a whole number of replays >= 1 (got {cfg.replays!r})", key="replays"
        )
    if cfg.offered_load not in OFFERED_LOADS:
        raise ConfigError(
            f"unknown offered load {cfg.offered_load!r}; one of {', '.join(OFFERED_LOADS)}",
            key="offered_load",
        )
    table = read_table(real_runs)
    check_columns(table)
    selection = select_runs(table, models=models, limit=limit, run_ids=run_ids)
    skipped = selection.skipped
    if not selection.runs:
        why = "; ".join(
            f"{n} x {reason}" for reason, n in _count([s.reason for s in skipped]).items()
        )
        raise ConfigError(
            f"no run to replay in {table.path} ({len(table.rows)} rows; "
            f"{selection.not_selected} not selected" + (f"; skipped: {why}" if why else "") + ")",
            key="real_runs",
        )
    specs = [s for s, _ in selection.runs]
    resolved = resolve_profiles(sorted({s.model for s in specs}), dict(profile_for or {}))
    paper_rows = _paper_rows(paper_runs)
    started = time.perf_counter()
    metrics = run_validation(specs, profile_for=resolved, cfg=cfg, jobs=jobs, progress=progress)
    elapsed = time.perf_counter() - started
    results = [
        RunResult(
            spec=s,
            profile=resolved[s.model],
            ours=m,
            real=_row_floats(row, _REAL_KEYS),
            paper=_row_floats(paper_rows.get(s.run_id), _PAPER_KEYS) or None,
        )
        for (s, row), m in zip(selection.runs, metrics, strict=True)
    ]
    summaries = summarize_results(results)
    return {
        "config": asdict(cfg),
        "real_runs": str(table.path),
        "rows_read": len(table.rows),
        "rows_not_selected": selection.not_selected,
        "runs_replayed": len(results),
        "runs_failed": [
            {
                "line": r.spec.line,
                "run_id": r.spec.run_id,
                "model": r.spec.model,
                "error": r.ours.error,
            }
            for r in results
            if r.ours.error
        ],
        "runs_skipped": [asdict(s) for s in skipped],
        "offered_load": _count([r.ours.offered_load for r in results if r.ours.offered_load]),
        "notes": _count([n for r in results for n in (*r.spec.notes, *r.ours.notes)]),
        "elapsed_s": elapsed,
        "cpu_s_total": sum(r.ours.wall_s for r in results),
        "models": [
            {
                "model": s.model,
                "profile": s.profile,
                "n": s.n,
                "ours": {k: v.as_dict() for k, v in s.ours.items()},
                "paper": {k: v.as_dict() for k, v in s.paper.items()},
            }
            for s in summaries
        ],
        "runs": [
            {
                "run_id": r.spec.run_id,
                "line": r.spec.line,
                "model": r.spec.model,
                **({"model_in_file": r.spec.model_in_file} if r.spec.model_in_file else {}),
                "profile": r.profile,
                "flag": r.spec.flag,
                "notes": [*r.spec.notes, *r.ours.notes],
                "ours": asdict(r.ours),
                "real": r.real,
                "paper": r.paper,
            }
            for r in results
        ],
    }
