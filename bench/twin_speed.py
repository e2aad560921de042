"""Twin engine speed: simulated seconds per CPU second for one replica over one simulated hour.

Usage: .venv/bin/python bench/twin_speed.py [--hours 1.0] [--only low,heavy,...] [--seed 0]
                                            [--profile NAME]

Workloads (profile ``--profile``, default our fitted ``llama-3.1-8b-h100``; vLLM settings of
the paper's 1-hour runs: max_num_seqs 2048, max_num_batched_tokens 2048; Poisson arrivals per
adapter; lengths drawn from ShareGPT's own joint length distribution as ``loragate twin
validate`` draws them, with the dataset's means, prompt 4..1024, prompt + output <= 2048):

* low:       64 adapters at the paper's light rates {0.1, 0.05, 0.025} req/s (~3.7 req/s)
* heavy-32:  32 adapters at the paper's heavy rates {1.6, 0.8, 0.4} req/s (~30 req/s, at capacity)
* heavy-320: 320 adapters at {1.6, 0.8, 0.4} req/s (~300 req/s offered: the paper's heaviest
             validation workload, 32 GPU slots, ranks {8, 16, 32}; ~1M arrivals per hour)
* saturated: 32 adapters, 8 GPU slots, 2x the replica's capacity (the queue never drains)

The engine is fed like a simulator would: arrivals are added 10 simulated seconds at a time
(``Engine.add_arrays``: columns, no request objects), then ``run_until``. "engine" CPU time covers
``add_arrays`` + ``run_until``; "total" also includes drawing the workload and building its
columns. Request ids ("r0", "r1", ...) are :class:`NumberedIds`: the engine makes an id string
only when the request is admitted, as most of heavy-320's requests never are. The paper twin's
speed is shown beside (DIGITAL_TWIN.md: ~89x on average, 17x under heavy load; its replays of the
validation runs, ``validation/paper_twin_runs.csv`` sim_wall_time_s: median 898x light, 45x
heavy).

The header's machine line times a fixed pure-Python loop (10M additions) in CPU seconds, so runs
on different days or machines can be compared: the speeds scale roughly inversely with it.

Ctrl-C: one line, exit 130, the case's process (several cases run one process each, started with
SIGINT ignored: the script alone handles it) killed.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from loragate.core.errors import ConfigError
from loragate.core.process_pool import ignore_sigint, sigint_deferred
from loragate.twin.engine import Engine, EngineConfig
from loragate.twin.profile import load_profile
from loragate.twin.request_ids import NumberedIds
from loragate.twin.validate_lengths import LengthModel, sharegpt_pairs

DEFAULT_PROFILE = "llama-3.1-8b-h100"  # the shipped, fitted profile users simulate with
PAPER = {"low": "~89x avg (median 898x light)", "heavy": "17x heavy (median 45x)"}


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    adapters: int
    rates_rps: tuple[float, ...]
    ranks: tuple[int, ...]
    max_loras: int
    max_lora_rank: int
    rate_scale: float = 1.0
    paper: str = ""


CASES = [
    Case(
        name="low",
        adapters=64,
        rates_rps=(0.1, 0.05, 0.025),
        ranks=(8, 16),
        max_loras=32,
        max_lora_rank=16,
        paper=PAPER["low"],
    ),
    Case(
        name="heavy-32",
        adapters=32,
        rates_rps=(1.6, 0.8, 0.4),
        ranks=(8, 16, 32),
        max_loras=16,
        max_lora_rank=32,
        paper=PAPER["heavy"],
    ),
    Case(
        name="heavy-320",
        adapters=320,
        rates_rps=(1.6, 0.8, 0.4),
        ranks=(8, 16, 32),
        max_loras=32,
        max_lora_rank=32,
        paper=PAPER["heavy"],
    ),
    Case(
        name="saturated",
        adapters=32,
        rates_rps=(1.6, 0.8, 0.4),
        ranks=(8, 16),
        max_loras=8,
        max_lora_rank=16,
        rate_scale=2.5,
        paper="",
    ),
]


def lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """ShareGPT's own joint prompt/output lengths under the paper's filter, as the validation
    replays draw them (the dataset's mean lengths)."""
    return sharegpt_pairs(rng, n, math.nan, math.nan, LengthModel())


@dataclass(frozen=True)
class Workload:
    """The requests of one case as columns, sorted by arrival."""

    request_ids: NumberedIds  # "r0", "r1", ...: made by the engine when read
    arrival_s: np.ndarray
    adapter: np.ndarray  # index into ``adapters``
    prompt: np.ndarray
    output: np.ndarray
    adapters: list[tuple[str | None, int]]  # (name, rank)


def build(case: Case, hours: float, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    horizon = hours * 3600.0
    times: list[np.ndarray] = []
    names: list[np.ndarray] = []
    for a in range(case.adapters):
        rate = case.rates_rps[a % len(case.rates_rps)] * case.rate_scale
        n = rng.poisson(rate * horizon)
        times.append(np.sort(rng.uniform(0.0, horizon, n)))
        names.append(np.full(n, a))
    t = np.concatenate(times)
    ad = np.concatenate(names)
    order = np.argsort(t)
    if np.any(np.diff(t[order]) == 0):  # ties (improbable): keep them by adapter, as before
        order = np.argsort(t, kind="stable")
    t, ad = t[order], ad[order]
    prompt, out = lengths(rng, len(t))
    ranks = case.ranks
    return Workload(
        request_ids=NumberedIds("r", 0, len(t)),
        arrival_s=t,
        adapter=ad,
        prompt=prompt,
        output=out,
        adapters=[(f"lora-{a}", ranks[a % len(ranks)]) for a in range(case.adapters)],
    )


def run(case: Case, hours: float, seed: int, profile_name: str) -> dict[str, float]:
    profile = load_profile(profile_name)
    cfg = EngineConfig(
        max_num_seqs=2048,
        max_num_batched_tokens=2048,
        max_model_len=131072,
        max_loras=case.max_loras,
        max_cpu_loras=max(case.max_loras, case.adapters),
        max_lora_rank=case.max_lora_rank,
    )
    c0 = time.process_time()
    w = build(case, hours, seed)
    horizon = hours * 3600.0
    # The caller's side: which requests arrive in each 10-s slice (not engine work).
    ticks = [min(horizon, 10.0 * (k + 1)) for k in range(int(np.ceil(horizon / 10.0)))]
    bounds = np.searchsorted(w.arrival_s, ticks, side="right").tolist()
    c1 = time.process_time()
    engine = Engine(cfg, profile)
    finished = 0
    for t, i, j in zip(ticks, [0, *bounds[:-1]], bounds, strict=True):
        engine.add_arrays(
            w.request_ids[i:j],
            w.arrival_s[i:j],
            w.adapter[i:j],
            w.prompt[i:j],
            w.output[i:j],
            adapters=w.adapters,
        )
        finished += len(engine.run_until(t))
    c2 = time.process_time()
    return {
        "requests": len(w.request_ids),
        "finished": finished,
        "steps": engine.steps_total,
        "engine_cpu_s": c2 - c1,
        "total_cpu_s": c2 - c0,
        "speed_engine": horizon / (c2 - c1),
        "speed_total": horizon / (c2 - c0),
        "waiting_end": engine.num_waiting,
        "running_end": engine.num_running,
        "preemptions": engine.num_preemptions_total,
        "loads": engine.loads_from_memory,
    }


def machine_reference_s() -> float:
    """CPU seconds of a fixed pure-Python loop of 10M additions (the machine's speed), run at
    module level like ``python -c 's = 0\nfor i in range(10_000_000): s += i'``."""
    c0 = time.process_time()
    exec("s = 0\nfor i in range(10_000_000):\n    s += i", {})
    return time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--profile", default=DEFAULT_PROFILE, help="twin profile (name or YAML file)")
    ap.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    try:  # bad input: one line before any work, not a traceback (or nothing) after the header
        unknown = sorted(set(names) - {c.name for c in CASES})
        if unknown:
            known = ", ".join(c.name for c in CASES)
            raise ConfigError(f"unknown case(s) {', '.join(unknown)}; known: {known}", key="--only")
        if not (math.isfinite(args.hours) and args.hours > 0):
            raise ConfigError(f"must be a positive number (got {args.hours:g})", key="--hours")
        load_profile(args.profile)
    except ConfigError as exc:
        print(f"{ap.prog}: error: {exc.message}", file=sys.stderr)
        return 2
    wanted = [c for c in CASES if not names or c.name in names]
    if not args.no_header:
        print(f"one replica, {args.hours:g} simulated hour(s), profile {args.profile}")
        print(f"machine: 10M-addition pure-Python loop {machine_reference_s():.2f} CPU s")
        print(
            f"{'case':<10} {'requests':>9} {'finished':>9} {'steps':>8} {'preempt':>7} "
            f"{'loads':>6} {'engine CPU s':>12} {'x real (engine)':>15} {'x real (total)':>14}"
            "  paper twin",
            flush=True,
        )
    if len(wanted) > 1:  # one fresh process per case: no heap left over from the previous one
        for case in wanted:
            # SIGINT ignored there (no traceback of its own): on Ctrl-C, killed and reaped here.
            # A Ctrl-C while Popen runs waits for it to return, so the child is held to kill.
            child: subprocess.Popen[bytes] | None = None
            try:
                with sigint_deferred():
                    child = subprocess.Popen(
                        [
                            sys.executable,
                            __file__,
                            f"--hours={args.hours}",
                            f"--seed={args.seed}",
                            f"--only={case.name}",
                            f"--profile={args.profile}",
                            "--no-header",
                        ],
                        preexec_fn=ignore_sigint,
                    )
                child.wait()
            except BaseException:
                if child is not None:
                    child.kill()
                    child.wait()
                raise
            if child.returncode != 0:
                print(
                    f"{ap.prog}: case {case.name} failed (exit {child.returncode})", file=sys.stderr
                )
                return 1
        return 0
    for case in wanted:
        r = run(case, args.hours, args.seed, args.profile)
        print(
            f"{case.name:<10} {r['requests']:>9.0f} {r['finished']:>9.0f} {r['steps']:>8.0f} "
            f"{r['preemptions']:>7.0f} {r['loads']:>6.0f} {r['engine_cpu_s']:>12.2f} "
            f"{r['speed_engine']:>14.0f}x {r['speed_total']:>13.0f}x  {case.paper}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("twin_speed.py: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
