"""Validate the twin against every real BSC run and print the error table with the runtime.

    .venv/bin/python bench/validate_twin.py [--jobs 2] [--out result.json] [--limit N]
        [--offered-load sent|accounted|nominal] [--model MODEL] [--seed S] [--replays K]

Same as ``loragate twin validate --real-runs ../shared/data/bsc-vllm-lora/validation/real_runs.csv``
(the default here; ``--paper-runs``: the ``paper_twin_runs.csv`` next to ``--real-runs``, as
the command) plus a per-workload breakdown of our errors (where the twin is weakest).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from loragate.commands.twin import (
    _clean,
    check_out_path,
    format_table,
    paper_runs_beside,
    write_out,
)
from loragate.core.errors import LoragateError
from loragate.twin.metrics_errors import summarize
from loragate.twin.validate import validate
from loragate.twin.validate_workload import DEFAULT_REPLAYS, OFFERED_LOADS, ValidateConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsc-vllm-lora" / "validation"


def _per_workload(result: dict[str, object]) -> str:
    groups: dict[str, list[dict[str, dict[str, float]]]] = defaultdict(list)
    for run in result["runs"]:  # type: ignore[attr-defined]
        if run["ours"].get("error"):
            continue
        groups[run["run_id"].rsplit("/", 1)[0]].append(run)
    lines = [
        f"{'workload':<52}{'n':>4}{'thr MAPE':>10}{'thr bias':>10}{'ITL MAPE':>10}{'ITL bias':>10}"
    ]
    for key in sorted(groups):
        runs = groups[key]
        thr = summarize(
            [r["real"]["total_throughput"] for r in runs],
            [r["ours"]["total_throughput"] for r in runs],
        )
        itl = summarize(
            [r["real"]["itl_mean_ms"] for r in runs], [r["ours"]["itl_mean_ms"] for r in runs]
        )
        lines.append(
            f"{key:<52}{len(runs):>4}{thr.mape_pct:>10.2f}{thr.median_bias_pct:>+10.2f}"
            f"{itl.mape_pct:>10.2f}{itl.median_bias_pct:>+10.2f}"
        )
    return "\n".join(lines)


def _replay_spread(result: dict[str, object]) -> str:
    """With --replays K > 1: per model, each single replay's MAPEs against the K-mean's, and
    how far one replay strays from the mean of K per run (the noise a single replay adds)."""
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in cast(list[dict[str, Any]], result["runs"]):
        if not run["ours"].get("error") and len(run["ours"].get("replay_itl_ms") or ()) > 1:
            by_model[run["model"]].append(run)
    lines = []
    for model, runs in sorted(by_model.items()):
        k = min(len(r["ours"]["replay_itl_ms"]) for r in runs)
        real_thr = [r["real"]["total_throughput"] for r in runs]
        real_itl = [r["real"]["itl_mean_ms"] for r in runs]
        for i in range(k):
            thr = summarize(real_thr, [r["ours"]["replay_throughput"][i] for r in runs])
            itl = summarize(real_itl, [r["ours"]["replay_itl_ms"][i] for r in runs])
            lines.append(
                f"{model:<24}replay {i}   thr MAPE {thr.mape_pct:5.2f} bias "
                f"{thr.median_bias_pct:+5.2f}  ITL MAPE {itl.mape_pct:5.2f} bias "
                f"{itl.median_bias_pct:+5.2f}"
            )
        thr = summarize(real_thr, [r["ours"]["total_throughput"] for r in runs])
        itl = summarize(real_itl, [r["ours"]["itl_mean_ms"] for r in runs])
        lines.append(
            f"{model:<24}mean of {k}  thr MAPE {thr.mape_pct:5.2f} bias "
            f"{thr.median_bias_pct:+5.2f}  ITL MAPE {itl.mape_pct:5.2f} bias "
            f"{itl.median_bias_pct:+5.2f}"
        )
        for name, key, mean_key in (
            ("ITL", "replay_itl_ms", "itl_mean_ms"),
            ("throughput", "replay_throughput", "total_throughput"),
        ):
            dev = sorted(
                abs(v / r["ours"][mean_key] - 1.0) * 100.0 for r in runs for v in r["ours"][key]
            )
            lines.append(
                f"{model:<24}one replay vs the mean, {name}: median |dev| "
                f"{dev[len(dev) // 2]:.2f}%, p90 {dev[int(0.9 * (len(dev) - 1))]:.2f}%, "
                f"max {dev[-1]:.2f}%"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """As ``loragate twin validate``: bad input is one line on stderr and exit 2, before any
    run; Ctrl-C is one line and exit 130."""
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__)
    parser.add_argument(
        "--real-runs",
        default=None,
        help=f"real_runs.csv (default: {DATA / 'real_runs.csv'}, the data set beside this clone)",
    )
    parser.add_argument(
        "--paper-runs",
        default=None,
        help="paper_twin_runs.csv (default: next to --real-runs if present)",
    )
    parser.add_argument("--jobs", type=int, default=0, help="worker processes (0 = all cores)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument(
        "--offered-load",
        choices=OFFERED_LOADS,
        default="sent",
        help="as loragate twin validate --offered-load",
    )
    parser.add_argument("--model", action="append", default=[], help="only runs of this model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--replays",
        type=int,
        default=DEFAULT_REPLAYS,
        help="as loragate twin validate --replays (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    real_runs = args.real_runs or str(DATA / "real_runs.csv")
    if args.real_runs is None and not Path(real_runs).is_file():
        print(
            f"{parser.prog}: error: no {real_runs} (the data set beside this clone): pass "
            "--real-runs FILE",
            file=sys.stderr,
        )
        return 2
    paper_runs = paper_runs_beside(real_runs) if args.paper_runs is None else args.paper_runs
    try:
        if args.out:
            check_out_path(Path(args.out))
        started = time.perf_counter()
        cfg = ValidateConfig(offered_load=args.offered_load, seed=args.seed, replays=args.replays)
        result = validate(
            real_runs,
            paper_runs=paper_runs,
            cfg=cfg,
            jobs=args.jobs,
            limit=args.limit,
            models=args.model,
        )
        wall = time.perf_counter() - started
        if args.out:
            write_out(Path(args.out), json.dumps(_clean(result), indent=1))
    except LoragateError as exc:
        print(f"{parser.prog}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    print(format_table(result))
    print()
    print(_per_workload(result))
    spread = _replay_spread(result)
    if spread:
        print()
        print(spread)
    sim_s = 3600.0 * sum(
        int(r["ours"].get("replays") or 1)
        for r in cast(list[dict[str, Any]], result["runs"])
        if not r["ours"].get("error")
    )
    cpu = float(result["cpu_s_total"])  # type: ignore[arg-type]
    print(
        f"\nwall {wall:.1f} s; simulated {sim_s / 3600:.0f} h in {cpu:.1f} CPU s "
        f"({sim_s / cpu if cpu > 0 and math.isfinite(cpu) else math.nan:.0f}x real time)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
