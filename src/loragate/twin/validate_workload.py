"""The requests a replay offers: its configuration, offered load and arrivals.

A synthesised run (a row of ``validation/real_runs.csv``):

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
- lengths: ShareGPT's (``validate_lengths``);
- replays (``ValidateConfig.replays``): the arrivals and lengths above are one random draw, as
  the real run was; the twin's prediction is the mean of the metrics over this many draws
  (seeds ``seed * replays + k``), its expected value rather than one realisation's.

Runs that name their exact requests (``requests_file``, as ``data/tiny-llama-cpu``'s real vLLM
CPU runs) are replayed exactly instead: every request's send time, adapter (with its rank) and
prompt/output lengths from that file (:func:`exact_arrivals`), the run's own ``max_num_seqs`` /
``max_num_batched_tokens`` / ``max_model_len`` / ``window_s``, the served adapters of
``adapter_ranks`` (``max_cpu_loras`` may be smaller) registered in order a0..aN-1 into the CPU
cache with no adapter in a GPU slot at t = 0, as the benchmark did.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from loragate.core.errors import ConfigError
from loragate.twin.real_runs import RunSpec, cell_float
from loragate.twin.validate_lengths import (
    SHAREGPT_OUTPUT_Q,
    SHAREGPT_PCT,
    SHAREGPT_PROMPT_Q,
    LengthModel,
    fit_length_mus,
    quantile_mean,
    sharegpt_pairs,
    truncated_lognormal_pairs,
)

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


# ---------------------------------------------------------------- arrivals


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


def offered_requests(
    spec: RunSpec, cfg: ValidateConfig, front_end_cap: int | None = None
) -> OfferedCount:
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
        return rates(
            "nominal (the requests left in the server at the end are less certain "
            "than the rates' Poisson spread)"
        )
    return OfferedCount(float(spec.accounted_requests), "accounted")


def synthesize_arrivals(
    spec: RunSpec, cfg: ValidateConfig, offered: OfferedCount | None = None
) -> Arrivals:
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
            mean_prompt = quantile_mean(SHAREGPT_PCT, SHAREGPT_PROMPT_Q)
        if not math.isfinite(mean_output):
            mean_output = quantile_mean(SHAREGPT_PCT, SHAREGPT_OUTPUT_Q)
        mu_p, mu_o = fit_length_mus(mean_prompt, mean_output, cfg.lengths)
        prompt, output = truncated_lognormal_pairs(rng, int(times.size), mu_p, mu_o, cfg.lengths)
    else:
        prompt, output = sharegpt_pairs(rng, int(times.size), mean_prompt, mean_output, cfg.lengths)
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
                raise ConfigError(
                    f"run {spec.run_id!r}: unknown adapter {name!r}", key="requests_file"
                )
            times.append(t)
            adapter.append(idx)
            prompt.append(int(float(row["input_tokens"])))
            output.append(int(float(row["output_tokens"])))
    if not times:
        raise ConfigError(
            f"no requests of run {spec.run_id!r} in {spec.requests_path}", key="requests_file"
        )
    order = np.argsort(np.asarray(times), kind="stable")
    return Arrivals(
        time_s=np.asarray(times, dtype=np.float64)[order],
        adapter=np.asarray(adapter, dtype=np.int64)[order],
        prompt=np.asarray(prompt, dtype=np.int64)[order],
        output=np.asarray(output, dtype=np.int64)[order],
    )
