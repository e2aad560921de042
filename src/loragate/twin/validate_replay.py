"""Replay one run in the twin (virtual time) and measure it like the benchmark.

- engine: the run's ``max_loras``, ``max_cpu_loras``, ``max_lora_rank``, token budget 2048,
  ``max_num_seqs`` 2048, the model's ``max_model_len`` (vLLM's start-up check); exact runs
  (``validate_workload``) their own settings;
- window: 3600 s; requests unfinished at the end are not counted (as in the benchmark).

Measured quantities are made comparable with the benchmark's: throughput = (prompt + output
tokens of completed requests) / window; mean ITL = pooled mean of the inter-token gaps of all
completed requests = sum(finish - first token) / sum(output tokens - 1) (streaming, one chunk
per step); mean TTFT over completed requests, and the paper's penalised TTFT (each unfinished
request counts the window length).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from loragate.core.errors import LoragateError
from loragate.twin.real_runs import MODEL_MAX_LEN, RunSpec, canonical_model
from loragate.twin.validate_workload import (
    ValidateConfig,
    exact_arrivals,
    offered_requests,
    synthesize_arrivals,
)

if TYPE_CHECKING:
    from loragate.twin.profile import PerformanceProfile

# When neither the row nor the model names max_model_len (replays of unknown models).
FALLBACK_MAX_MODEL_LEN = 4096
FEED_CHUNK_S = 5.0
BACKLOG_CHUNK_S = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class RunMetrics:
    total_throughput: float
    itl_mean_ms: float
    ttft_mean_ms: float
    ttft_mean_penalised_ms: float
    requests_sent: int
    successful_requests: int
    preemptions: int = 0
    mean_running: float = math.nan
    mean_waiting: float = math.nan  # engine queue + front-end backlog
    wall_s: float = 0.0
    error: str = ""
    offered_load: str = ""  # where the number of offered requests came from
    notes: tuple[str, ...] = ()
    # With ValidateConfig.replays > 1: the metrics above are means over the replays (counts
    # rounded, wall_s summed); each replay's throughput and mean ITL.
    replays: int = 1
    replay_throughput: tuple[float, ...] = ()
    replay_itl_ms: tuple[float, ...] = ()


# ---------------------------------------------------------------- replay one run


def replay_run(spec: RunSpec, profile_ref: str, cfg: ValidateConfig) -> RunMetrics:
    """Replay one run in virtual time and measure it like the benchmark does.

    A synthesised run is replayed ``cfg.replays`` times, replay k with seed
    ``cfg.seed * cfg.replays + k`` (so different seeds share no replay), and the metrics are
    averaged (:func:`mean_metrics`). A run with its exact requests is replayed once: the engine
    is deterministic.
    """
    from loragate.twin.profile import load_profile

    profile = load_profile(profile_ref)
    replays = 1 if spec.requests_path else cfg.replays
    if replays == 1:
        return _replay_once(spec, profile, cfg)
    runs: list[RunMetrics] = []
    for k in range(replays):
        metrics = _replay_once(spec, profile, replace(cfg, seed=cfg.seed * replays + k))
        if metrics.error:
            return metrics
        runs.append(metrics)
    return mean_metrics(runs)


def mean_metrics(runs: Sequence[RunMetrics]) -> RunMetrics:
    """The mean of several replays of one run (counts rounded; CPU time summed). A metric a
    replay could not measure (``nan``: e.g. no completed request in a short window) is the
    mean of the replays that did."""

    def mean(name: str) -> float:
        values = [v for m in runs if math.isfinite(v := float(getattr(m, name)))]
        return float(np.mean(values)) if values else math.nan

    return replace(
        runs[0],
        total_throughput=mean("total_throughput"),
        itl_mean_ms=mean("itl_mean_ms"),
        ttft_mean_ms=mean("ttft_mean_ms"),
        ttft_mean_penalised_ms=mean("ttft_mean_penalised_ms"),
        requests_sent=round(mean("requests_sent")),
        successful_requests=round(mean("successful_requests")),
        preemptions=round(mean("preemptions")),
        mean_running=mean("mean_running"),
        mean_waiting=mean("mean_waiting"),
        wall_s=sum(m.wall_s for m in runs),
        replays=len(runs),
        replay_throughput=tuple(m.total_throughput for m in runs),
        replay_itl_ms=tuple(m.itl_mean_ms for m in runs),
    )


def _replay_once(spec: RunSpec, profile: PerformanceProfile, cfg: ValidateConfig) -> RunMetrics:
    """One replay of ``spec`` with ``cfg.seed`` (see :func:`replay_run`)."""
    from loragate.twin.engine import Engine, EngineConfig, EngineRequest, EngineStartupError

    started = time.process_time()
    # Front end: vLLM's waiting queue saturates (R3: ~20k requests) while the rest of the sent
    # requests wait in the HTTP server; they join the queue FCFS as it drains, keeping their
    # send time (their TTFT includes the front-end wait).
    cap = profile.scheduler.max_waiting if cfg.front_end_cap else None
    if spec.requests_path:
        window_s = min(cfg.window_s, spec.real_window_s)
        arrivals = exact_arrivals(spec, window_s)
        offered = "requests_file"
    else:
        window_s = cfg.window_s
        chosen = offered_requests(spec, cfg, cap)
        arrivals = synthesize_arrivals(spec, cfg, chosen)
        offered = chosen.source
    n = int(arrivals.time_s.size)
    max_model_len, notes = _max_model_len(spec, profile)
    engine_cfg = EngineConfig(
        max_num_seqs=spec.max_num_seqs or cfg.max_num_seqs,
        max_num_batched_tokens=spec.token_budget or cfg.token_budget,
        max_model_len=max_model_len,
        enable_lora=True,
        max_loras=spec.max_loras,
        max_cpu_loras=spec.max_cpu_loras,
        max_lora_rank=spec.max_lora_rank,
    )
    # Bind the profile to this engine (slot-dependent LoRA cost, padding of smaller ranks) and
    # to this workload's mean context of a running request (time-weighted: a request is
    # running for as many steps as it has output tokens).
    out_f = arrivals.output.astype(np.float64)
    ctx = float(np.sum(out_f * (arrivals.prompt + (out_f - 1.0) / 2.0)) / max(out_f.sum(), 1.0))
    profile = profile.specialize(
        max_loras=spec.max_loras, max_lora_rank=spec.max_lora_rank, context_tokens_per_seq=ctx
    )
    try:
        engine = Engine(engine_cfg, profile)
    except EngineStartupError as exc:
        return RunMetrics(
            total_throughput=math.nan,
            itl_mean_ms=math.nan,
            ttft_mean_ms=math.nan,
            ttft_mean_penalised_ms=math.nan,
            requests_sent=n,
            successful_requests=0,
            offered_load=offered,
            notes=notes,
            error=f"the twin's vLLM would not start: {exc.message}",
        )
    names = [f"adapter-{i}" for i in range(len(spec.ranks))]
    # The benchmark's server loads every served adapter at start-up (idle: costs no step time);
    # exact replays register them in order into the CPU cache only (its LRU keeps the last).
    for name, rank in zip(names, spec.ranks, strict=True):
        engine.load_adapter(name, rank, to_gpu=spec.adapters_in_gpu_at_start)
    times = arrivals.time_s.tolist()
    adapters = arrivals.adapter.tolist()
    prompts = arrivals.prompt.tolist()
    outputs = arrivals.output.tolist()
    records = []
    # Arrivals are handed over a chunk ahead of time (the engine queues future arrivals and
    # admits each at its own time), so run_until is called once per chunk, not per request.
    ranks = spec.ranks
    backlog: deque[int] = deque()
    # Sampled every feed_s, like the real series (.npy every 5 s; exact replays: /metrics 1 s).
    feed_s = 1.0 if spec.requests_path else FEED_CHUNK_S
    running_samples: list[int] = []
    next_sample_s = feed_s
    waiting_samples: list[int] = []
    start = 0
    chunk_end = 0.0
    while chunk_end < window_s:
        # With a backlog the engine queue is topped up often, so it never runs dry meanwhile.
        chunk_end = min(chunk_end + (BACKLOG_CHUNK_S if backlog else feed_s), window_s)
        stop = bisect.bisect_left(times, chunk_end, lo=start)
        if cap is None:
            admit: range | list[int] = range(start, stop)
        else:
            backlog.extend(range(start, stop))
            room = max(cap - engine.num_waiting, 0)
            admit = [backlog.popleft() for _ in range(min(room, len(backlog)))]
        engine.add_requests(
            EngineRequest(
                request_id=str(i),
                adapter=names[adapters[i]],
                adapter_rank=ranks[adapters[i]],
                prompt_tokens=prompts[i],
                max_tokens=outputs[i],
                arrival_s=times[i],
            )
            for i in admit
        )
        start = stop
        records.extend(engine.run_until(chunk_end))
        if chunk_end >= next_sample_s:
            next_sample_s += feed_s
            running_samples.append(engine.num_running)
            waiting_samples.append(engine.num_waiting + len(backlog))
    done = [r for r in records if r.finish_s <= window_s]
    tokens = sum(r.prompt_tokens + r.output_tokens for r in done)
    gaps = sum(r.finish_s - r.first_token_s for r in done if r.output_tokens > 1)
    gap_count = sum(r.output_tokens - 1 for r in done if r.output_tokens > 1)
    ttft_sum = sum(r.first_token_s - r.arrival_s for r in done)
    unfinished = n - len(done)
    return RunMetrics(
        total_throughput=tokens / window_s,
        itl_mean_ms=1000.0 * gaps / gap_count if gap_count else math.nan,
        ttft_mean_ms=1000.0 * ttft_sum / len(done) if done else math.nan,
        ttft_mean_penalised_ms=(1000.0 * (ttft_sum + unfinished * window_s) / n if n else math.nan),
        requests_sent=n,
        successful_requests=len(done),
        preemptions=int(getattr(engine, "num_preemptions_total", 0)),
        mean_running=float(np.mean(running_samples)) if running_samples else math.nan,
        mean_waiting=float(np.mean(waiting_samples)) if waiting_samples else math.nan,
        wall_s=time.process_time() - started,
        offered_load=offered,
        notes=notes,
    )


def _max_model_len(spec: RunSpec, profile: PerformanceProfile) -> tuple[int, tuple[str, ...]]:
    """The row's max_model_len, else its model's default, else that of the profile's model."""
    if spec.max_model_len:
        return spec.max_model_len, ()
    if spec.model in MODEL_MAX_LEN:
        return MODEL_MAX_LEN[spec.model], ()
    fitted_on = canonical_model(str(profile.fit.get("model") or ""))
    if fitted_on in MODEL_MAX_LEN:
        return MODEL_MAX_LEN[fitted_on], (
            f"max_model_len of {spec.model} unknown: {MODEL_MAX_LEN[fitted_on]}, the default "
            f"of {fitted_on} (profile {profile.name}'s model)",
        )
    return FALLBACK_MAX_MODEL_LEN, (
        f"max_model_len of {spec.model} unknown: {FALLBACK_MAX_MODEL_LEN} assumed (a "
        "max_model_len column sets it; vLLM's start-up check uses it)",
    )


def replay_job(job: tuple[RunSpec, str, ValidateConfig]) -> RunMetrics:
    spec, profile_ref, cfg = job
    try:
        return replay_run(spec, profile_ref, cfg)
    except LoragateError as exc:
        return failed_metrics(exc.message)
    except Exception as exc:  # one bad run must not sink the whole table
        return failed_metrics(f"{type(exc).__name__}: {exc}")


def failed_metrics(error: str) -> RunMetrics:
    return RunMetrics(
        total_throughput=math.nan,
        itl_mean_ms=math.nan,
        ttft_mean_ms=math.nan,
        ttft_mean_penalised_ms=math.nan,
        requests_sent=0,
        successful_requests=0,
        error=error,
    )
