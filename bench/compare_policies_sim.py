"""Every routing policy on the same simulated deployment (issue 4 item 8).

Setup: ``loragate simulate`` machinery with the ``llama-3.1-8b-h100`` twin profile, 4 replicas
(``max_loras`` 8, ``max_cpu_loras`` 32), the ``workload/zipf-200.yaml`` adapters (200, ranks
8/16/32, Zipf 1.0), Poisson arrivals at ``--load`` (0.7) x the cluster's capacity, one simulated
hour, seeds 1..3. Run::

    .venv/bin/python bench/compare_policies_sim.py                      # the item-8 table
    .venv/bin/python bench/compare_policies_sim.py --duration-s 600     # a quick look
    .venv/bin/python bench/compare_policies_sim.py --zipf-s 0.8         # a second workload
    .venv/bin/python bench/compare_policies_sim.py --rate-rps 21 --json # a fixed rate
    .venv/bin/python bench/compare_policies_sim.py --rate-rps 7.175 --free-disk-loads
                                        # what-if: the table's rate, disk loads taking no time
    .venv/bin/python bench/compare_policies_sim.py --rate-rps 7.175 \
        --policies loragate,examples/policies/composed_affinity.yaml   # your own policy file

Capacity (printed, and in ``--json``): the *SLO goodput* of the cluster under ``round_robin``,
i.e. the highest total arrival rate at which the adapter-blind baseline still serves at least
``--capacity-attainment`` (90%) of the requests within the TTFT SLO (``--ttft-slo-ms``, 1 s, the
simulator's default) and is not starved (achieved token throughput >= 0.9 x offered). "Goodput"
as in DistServe (Zhong et al., OSDI 2024: the maximum request rate at which the SLO attainment
goal is met); round_robin because it is what the cluster does without adapter-aware routing,
so the load is defined independently of the policies compared. Found by bisection over the
total rate with short runs (``--capacity-duration-s``, every seed must pass), to within 2%.

Why not the throughput limit: with 200 adapters and 8 LoRA slots per replica the engines are
slot-bound and behave like polling systems: deferred requests pile up per adapter and are then
served in one slot activation, so the queue itself raises throughput. round_robin's queues stay
bounded up to ~30 req/s on this workload, but at a TTFT of 30-60 s (measured 1800 s runs: mean
TTFT flat at ~40 s at 22 req/s, ~65 s at 28 req/s). A "capacity" whose median user waits half a
minute is not one anybody provisions for; ``--rate-rps`` runs the table at any other rate.

Columns (mean over seeds; ``±`` is half the range over seeds): TTFT p50/p99 and E2E p99 of the
finished requests, throughput (requests finished inside the workload window per second), SLO
attainment, adapter loads as the summary counts them (``adapter_loads`` = ``gpu`` + ``disk``):
``gpu`` = CPU->GPU slot loads (every activation of an adapter that was not in a GPU slot,
including those that came from disk), ``disk`` = disk->CPU loads (the adapter was in neither
cache), and deferred requests (requests that waited behind ``max_loras``).

Targets checked (item 8): ``loragate`` has the lowest mean TTFT p99, at least 30% below the best
other policy, and at most one third of ``round_robin``'s adapter loads (shown for the summary's
total and for ``gpu`` and ``disk`` separately). ``--check`` exits 1 if a target is missed.

Cost: one 1-hour 4-replica run at ~7 req/s takes ~2-3 s CPU (~7 s at 21 req/s); the default
table (bisection with 27 short runs, then 6 policies x 3 seeds) ~65 s CPU, ~4 min wall on a
busy 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loragate.commands.simulate import policy_from_arg
from loragate.core.errors import ConfigError
from loragate.core.process_pool import WorkerPool, stop_pool
from loragate.routing import build_policy
from loragate.simulate import ReplicaEngineSettings, SimulationConfig, run_simulation
from loragate.simulate.runner import Simulation
from loragate.twin.profile import RankCost, load_profile
from loragate.workload import Workload, load_spec
from loragate.workload.spec import WorkloadSpec, ZipfPopularity

POLICIES = (
    "round_robin",
    "least_loaded",
    "consistent_hash",
    "lora_affinity",
    "lru_multiplex",
    "loragate",
)
OURS = "loragate"
BASELINE = "round_robin"
TTFT_MARGIN = 0.30  # loragate's TTFT p99 at least 30% below the best other policy
LOADS_RATIO = 1.0 / 3.0  # ... and at most a third of round_robin's adapter loads
REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Setup:
    workload: str
    profile: str
    replicas: int
    max_loras: int
    max_cpu_loras: int
    zipf_s: float | None
    ttft_slo_ms: float
    free_disk_loads: bool = False  # what-if: disk->CPU loads cost nothing (table runs only)

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, ttft_slo_ms: float) -> Setup:
        """The deployment of ``add_deployment_args``' options."""
        return cls(
            workload=args.workload,
            profile=args.profile,
            replicas=args.replicas,
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            zipf_s=args.zipf_s,
            ttft_slo_ms=ttft_slo_ms,
            free_disk_loads=getattr(args, "free_disk_loads", False),
        )


def check_setup(setup: Setup) -> None:
    """A one-second round_robin run of the deployment, before any real one: a bad --workload,
    --profile or engine setting (--replicas 0) is a ``ConfigError`` now, not a traceback from
    a worker after the capacity search has run for minutes."""
    run_one((setup, BASELINE, 1.0, 1.0, 1))


def make_spec(setup: Setup, *, rate_rps: float, duration_s: float, seed: int) -> WorkloadSpec:
    spec = load_spec(setup.workload)
    if spec.arrivals.rate_rps is None:
        raise SystemExit(f"{setup.workload}: arrivals have no rate_rps to scale")
    spec = dataclasses.replace(
        spec,
        duration_s=duration_s,
        seed=seed,
        arrivals=dataclasses.replace(spec.arrivals, rate_rps=rate_rps),
    )
    if setup.zipf_s is not None:
        adapters = dataclasses.replace(spec.adapters, popularity=ZipfPopularity(s=setup.zipf_s))
        spec = dataclasses.replace(spec, adapters=adapters)
    return spec


# A policy of --policies: (its label in the table, the name or routing section it builds from).
PolicyArg = tuple[str, str | dict[str, Any]]


def parse_policies(text: str) -> list[PolicyArg]:
    """``--policies``' comma list: built-in names and policy files (a routing section, a name,
    or a gateway config, as ``loragate simulate --policy FILE`` reads them), each checked here,
    before any run, so a bad one is one line naming it (``unknown policy 'loragte' (is it a
    misspelling of 'loragate'?; ...)``, ``p.yaml:3:7: routing.filters[0]: unknown filter
    ...``). A file's label is the path as given. Raises ``ConfigError``."""
    out: list[PolicyArg] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if any(label == item for label, _ in out):
            raise ConfigError(f"{item!r} is given twice")
        spec = policy_from_arg(item)  # a file: read and built here, errors naming its line
        if spec == item:  # a name: build it to check it
            build_policy(item, key="")  # (no key: the message is "unknown policy ...")
        out.append((item, spec))
    if not out:
        raise ConfigError("names no policy")
    return out


def run_one(args: tuple[Setup, str | PolicyArg, float, float, int]) -> dict[str, Any]:
    """One simulation; the figures the table needs (runs in a worker process)."""
    setup, policy_arg, rate_rps, duration_s, seed = args
    policy, policy_spec = (policy_arg, policy_arg) if isinstance(policy_arg, str) else policy_arg
    spec = make_spec(setup, rate_rps=rate_rps, duration_s=duration_s, seed=seed)
    config = SimulationConfig(
        replicas=setup.replicas,
        profile=setup.profile,
        policy=policy_spec,
        engine=ReplicaEngineSettings(max_loras=setup.max_loras, max_cpu_loras=setup.max_cpu_loras),
        seed=seed,
        ttft_slo_ms=setup.ttft_slo_ms,
    )
    cpu0 = time.process_time()
    if setup.free_disk_loads:
        profile = load_profile(setup.profile)
        free = dataclasses.replace(profile.loading, disk_to_cpu=RankCost())
        profile = dataclasses.replace(profile, loading=free)
        s = Simulation(Workload(spec), config, profile=profile).run().summary
    else:
        s = run_simulation(Workload(spec), config).summary
    reps = s["replicas"].values()
    return {
        "policy": policy,
        "seed": seed,
        "rate_rps": rate_rps,
        "requests": s["requests"]["total"],
        "ttft_p50_s": s["ttft_s"]["p50"],
        "ttft_p99_s": s["ttft_s"]["p99"],
        "e2e_p99_s": s["e2e_s"]["p99"],
        "throughput_rps": s["throughput"]["requests_per_s"],
        "slo_attainment": s["slo"]["attainment"],
        "starved": s["starved"],
        "adapter_loads": sum(r["adapter_loads"] for r in reps),
        "gpu_loads": sum(r["loads_from_memory"] for r in reps),
        "disk_loads": sum(r["loads_from_disk"] for r in reps),
        "deferred": s["deferred"]["requests"],
        "routed_per_replica": s["routed_per_replica"],
        "cpu_s": time.process_time() - cpu0,
    }


Mapper = Callable[[Callable[[Any], dict[str, Any]], Sequence[Any]], list[dict[str, Any]]]


def within_slo(runs: Sequence[dict[str, Any]], attainment: float) -> bool:
    return all(not r["starved"] and (r["slo_attainment"] or 0.0) >= attainment for r in runs)


def find_capacity(
    setup: Setup,
    seeds: Sequence[int],
    *,
    duration_s: float,
    attainment: float,
    pmap: Mapper,
    log: Callable[[str], None],
) -> tuple[float, list[dict[str, Any]]]:
    """round_robin's SLO goodput (see the module doc) by doubling, then bisection to 2%."""
    probes: list[dict[str, Any]] = []

    def ok(rate: float) -> bool:
        runs = pmap(run_one, [(setup, BASELINE, rate, duration_s, s) for s in seeds])
        good = within_slo(runs, attainment)
        att = min(r["slo_attainment"] or 0.0 for r in runs)
        probes.append({"rate_rps": rate, "ok": good, "min_attainment": att})
        log(
            f"  capacity probe {rate:7.2f} req/s: min SLO attainment {att:.3f} -> "
            f"{'ok' if good else 'over'}"
        )
        return good

    lo, hi = 0.0, 4.0
    while ok(hi):
        lo, hi = hi, hi * 2.0
        if hi > 4096:
            raise SystemExit("capacity search did not saturate below 4096 req/s")
    while hi - lo > 0.02 * hi:
        mid = (lo + hi) / 2.0
        if ok(mid):
            lo = mid
        else:
            hi = mid
    if lo <= 0.0:
        raise SystemExit("round_robin misses the SLO even at the lowest probed rate")
    return lo, probes


def _mean_spread(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2.0


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = (
        "ttft_p50_s",
        "ttft_p99_s",
        "e2e_p99_s",
        "throughput_rps",
        "slo_attainment",
        "adapter_loads",
        "gpu_loads",
        "disk_loads",
        "deferred",
        "requests",
        "cpu_s",
    )
    out: dict[str, dict[str, Any]] = {}
    for policy in dict.fromkeys(r["policy"] for r in runs):
        mine = [r for r in runs if r["policy"] == policy]
        agg: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for k in keys:
            mean, spread = _mean_spread([float(r[k]) for r in mine])
            agg[k] = mean
            agg[f"{k}_spread"] = spread
        agg["starved_runs"] = sum(bool(r["starved"]) for r in mine)
        out[policy] = agg
    return out


def check_targets(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ours = table[OURS]
    others = {p: a for p, a in table.items() if p != OURS}
    best_name = min(others, key=lambda p: others[p]["ttft_p99_s"])
    best = others[best_name]["ttft_p99_s"]
    base = table[BASELINE]
    ratio = {
        k: ours[k] / base[k] if base[k] > 0 else float("inf")
        for k in ("adapter_loads", "gpu_loads", "disk_loads")
    }
    return {
        "best_other_policy": best_name,
        "best_other_ttft_p99_s": best,
        "ttft_p99_below_best_other": 1.0 - ours["ttft_p99_s"] / best,
        "loads_ratio_to_round_robin": ratio,
        "lowest_ttft_p99": ours["ttft_p99_s"] < best,
        "ttft_p99_30pct_below_best_other": ours["ttft_p99_s"] <= (1.0 - TTFT_MARGIN) * best,
        "adapter_loads_third_of_round_robin": ratio["adapter_loads"] <= LOADS_RATIO,
    }


def _ms(a: dict[str, Any], k: str) -> str:
    return f"{a[k] * 1e3:7.0f} ±{a[k + '_spread'] * 1e3:<5.0f}"


def _s(a: dict[str, Any], k: str) -> str:
    return f"{a[k]:6.1f} ±{a[k + '_spread']:<4.1f}"


def _n(a: dict[str, Any], k: str) -> str:
    return f"{a[k]:7.0f} ±{a[k + '_spread']:<5.0f}"


def print_table(table: dict[str, dict[str, Any]]) -> None:
    w = max([16, *(len(policy) for policy in table)])  # a policy file's label is its path
    head = (
        f"{'policy':{w}} {'TTFT p50 ms':>14} {'TTFT p99 ms':>14} {'E2E p99 s':>12} "
        f"{'req/s':>6} {'SLO':>6} {'adapter loads':>14} {'gpu loads':>14} "
        f"{'disk loads':>14} {'deferred':>14}"
    )
    print(head)
    print("-" * len(head))
    for policy, a in table.items():
        print(
            f"{policy:{w}} {_ms(a, 'ttft_p50_s')} {_ms(a, 'ttft_p99_s')} {_s(a, 'e2e_p99_s')} "
            f"{a['throughput_rps']:6.2f} {a['slo_attainment']:6.1%} {_n(a, 'adapter_loads')} "
            f"{_n(a, 'gpu_loads')} {_n(a, 'disk_loads')} {_n(a, 'deferred')}"
            + (f"  starved in {a['starved_runs']} runs" if a["starved_runs"] else "")
        )


def print_targets(t: dict[str, Any]) -> None:
    def mark(ok: bool) -> str:
        return "MET " if ok else "MISSED"

    r = t["loads_ratio_to_round_robin"]
    print(f"\ntargets for {OURS}:")
    print(
        f"  [{mark(t['lowest_ttft_p99'])}] lowest TTFT p99 (best other: "
        f"{t['best_other_policy']}, {t['best_other_ttft_p99_s'] * 1e3:.0f} ms)"
    )
    print(
        f"  [{mark(t['ttft_p99_30pct_below_best_other'])}] TTFT p99 >= 30% below the best "
        f"other: {t['ttft_p99_below_best_other']:.1%} below"
    )
    print(
        f"  [{mark(t['adapter_loads_third_of_round_robin'])}] adapter loads <= 1/3 of "
        f"{BASELINE}: {r['adapter_loads']:.2f}x (gpu {r['gpu_loads']:.2f}x, "
        f"disk {r['disk_loads']:.2f}x)"
    )


def add_deployment_args(ap: argparse.ArgumentParser) -> None:
    """The item-8 deployment's options (also used by ``routing_bounds.py``)."""
    ap.add_argument("--workload", default=str(REPO / "workload" / "zipf-200.yaml"))
    ap.add_argument("--zipf-s", type=float, default=None, help="override the Zipf exponent")
    ap.add_argument("--profile", default="llama-3.1-8b-h100")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--max-cpu-loras", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    ap.add_argument("--duration-s", type=float, default=3600.0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_deployment_args(ap)
    ap.add_argument("--load", type=float, default=0.7, help="fraction of capacity offered")
    ap.add_argument("--rate-rps", type=float, default=None, help="skip the capacity search")
    ap.add_argument("--capacity-duration-s", type=float, default=900.0)
    ap.add_argument("--capacity-attainment", type=float, default=0.9)
    ap.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    ap.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="comma list of built-in policy names and policy files (as `loragate simulate "
        "--policy FILE` takes; e.g. examples/policies/composed_affinity.yaml), each checked "
        "before any run (default: %(default)s)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--json", action="store_true", help="print everything as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ap.add_argument(
        "--free-disk-loads",
        action="store_true",
        help="what-if: disk->CPU adapter loads take no time in the table's runs (the capacity "
        "search keeps the profile's; pass --rate-rps to compare at the default table's rate)",
    )
    args = ap.parse_args(argv)
    try:
        args.policy_args = parse_policies(args.policies)
    except ConfigError as exc:
        ap.error(f"--policies: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    setup = Setup.from_args(args, ttft_slo_ms=args.ttft_slo_ms)
    try:
        check_setup(setup)
    except ConfigError as exc:
        print(f"compare_policies_sim.py: error: {exc}", file=sys.stderr)
        return 2
    seeds = list(range(1, args.seeds + 1))
    policies: list[PolicyArg] = args.policy_args
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    with WorkerPool(max(1, args.jobs)) as pool:

        def pmap(fn: Callable[[Any], dict[str, Any]], items: Sequence[Any]) -> list[dict[str, Any]]:
            try:
                return list(pool.map(fn, items))
            except BaseException:  # Ctrl-C: not every queued hour-long run first
                stop_pool(pool)
                raise

        capacity: float | None = None
        probes: list[dict[str, Any]] = []
        if args.rate_rps is None:
            log(
                f"capacity: round_robin SLO goodput (TTFT <= {args.ttft_slo_ms:g} ms for >= "
                f"{args.capacity_attainment:.0%}, not starved), {args.capacity_duration_s:g} s "
                f"runs, seeds {seeds}"
            )
            capacity, probes = find_capacity(
                dataclasses.replace(setup, free_disk_loads=False),
                seeds,
                duration_s=args.capacity_duration_s,
                attainment=args.capacity_attainment,
                pmap=pmap,
                log=log,
            )
            rate = args.load * capacity
            log(f"capacity {capacity:.2f} req/s -> offered {rate:.2f} req/s ({args.load:.0%})")
        else:
            rate = args.rate_rps
        jobs = [(setup, p, rate, args.duration_s, s) for p in policies for s in seeds]
        runs = pmap(run_one, jobs)
    table = aggregate(runs)
    targets = check_targets(table) if OURS in table and BASELINE in table else None
    wall_s = time.perf_counter() - wall0
    if args.json:
        print(
            json.dumps(
                {
                    "setup": dataclasses.asdict(setup),
                    "seeds": seeds,
                    "duration_s": args.duration_s,
                    "capacity_rps": capacity,
                    "capacity_probes": probes,
                    "load": args.load if capacity is not None else None,
                    "rate_rps": rate,
                    "table": table,
                    "targets": targets,
                    "runs": runs,
                    "wall_s": wall_s,
                },
                indent=2,
            )
        )
    else:
        wl = Path(args.workload).stem + (f" (zipf s={args.zipf_s:g})" if args.zipf_s else "")
        print(
            f"\n{wl}, {args.replicas} replicas (max_loras {args.max_loras}, max_cpu_loras "
            f"{args.max_cpu_loras}), profile {args.profile}"
            f"{' with free disk loads (what-if)' if args.free_disk_loads else ''}, "
            f"{rate:.2f} req/s Poisson, "
            f"{args.duration_s:g} s, seeds {seeds} (mean ± half-range)\n"
        )
        print_table(table)
        if targets is not None:
            print_targets(targets)
        cpu = sum(r["cpu_s"] for r in runs)
        print(f"\n{len(runs)} runs, {cpu:.0f} s CPU in the table runs; {wall_s:.0f} s wall total")
    ok = targets is None or all(
        targets[k]
        for k in (
            "lowest_ttft_p99",
            "ttft_p99_30pct_below_best_other",
            "adapter_loads_third_of_round_robin",
        )
    )
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("compare_policies_sim.py: interrupted", file=sys.stderr)
        sys.exit(130)
