"""How far can routing alone go on the item-8 deployment? Bounds on adapter loads and TTFT.

Issue 4 item 8 asks ``loragate`` for a TTFT p99 30% below the best other policy and a third of
``round_robin``'s adapter loads (``bench/compare_policies_sim.py``). This script gives the two
limits that no routing policy can pass there::

    .venv/bin/python bench/routing_bounds.py                  # 7.175 req/s, seeds 1..3
    .venv/bin/python bench/routing_bounds.py --zipf-s 0.8     # the second workload

**Adapter loads** (a pure cache model, no timing): the table's request stream (same workload
spec, rate and seeds as ``compare_policies_sim.py``) replayed through ``--replicas`` caches,
each a two-tier LRU like vLLM's and ``state.residency``'s (a CPU cache of ``max_cpu_loras``
holding the ``max_loras`` GPU slots; evicting from the CPU cache frees the slot). Disk loads
are CPU-cache misses, GPU loads slot misses (including those from disk); ``adapter loads`` =
GPU + disk, as the simulator's summary counts them. Strategies:

* ``round_robin``: adapter-blind;
* ``partition``: a static, traffic-balanced partition (adapters in order of their request
  count in the stream dealt to replicas in snake order), i.e. consistent hashing with
  perfect balance;
* ``holders+lru``: a replica holding the adapter (GPU slot first, then CPU cache), else the
  replica whose LRU victim was used longest ago, so the union of the caches acts as one LRU;
* ``holders+lfu``: the same, else the replica whose victim has the fewest requests so far;
* ``pinned``: an oracle static *placement*, not reachable by routing over LRU caches: the
  ``replicas x (max_cpu_loras - 1)`` most popular adapters pinned in the CPU caches
  (partitioned as above), the rest through one LRU entry per replica;
* ``pooled_a0``: the best any *non-clairvoyant* strategy can do, routing and placement
  included: the replicas' caches pooled into one CPU cache of ``replicas x max_cpu_loras``
  entries and one GPU cache of ``replicas x max_loras`` (a strategy over separate replicas can
  only do worse: its distinct resident adapters fit in these), each run by A0 -- the
  ``capacity - 1`` most requested adapters pinned, one entry for the rest. Under the
  independent reference model (each request's adapter drawn independently from a fixed
  popularity, as in this Poisson/Zipf workload) A0 minimises the expected number of misses over
  every replacement policy that does not know the future (Aho, Denning & Ullman, "Principles of
  optimal page replacement", J. ACM 18(1), 1971); pre-warming loads are loads too. The pinned set
  is the stream's own most requested adapters (an oracle on popularity), so this is if anything
  below the true online optimum;
* ``belady``: Belady's offline optimum for one cache of ``replicas x max_cpu_loras`` entries
  (disk) and one of ``replicas x max_loras`` (GPU): a lower bound on loads for any routing
  and any placement (a pre-warming load is a load too), since the replicas together never
  hold more distinct adapters than that.

The model leaves out timing (vLLM pins the slots of running adapters, and a deferred adapter
is loaded only when it gets a slot); at 7.175 req/s its ``round_robin`` and ``partition`` rows
agree with the twin's ``round_robin`` and ``loragate`` to ~1% in adapter loads (3% in disk
loads).

**TTFT floor** (``--floor``): each request of the stream alone on an idle replica with its
adapter already in a GPU slot (chunked prefill under ``max_num_batched_tokens``, the
profile's step time specialised to the deployment's LoRA settings). Its p99 is below what any
routing or placement reaches: it leaves out adapter loads and every other request. With cold
loads: the same, except that the replicas' CPU caches hold at most ``replicas x
max_cpu_loras`` adapters in all (chosen for the lowest p99: ``cold_floor_p99``) and a request
whose adapter is in none pays its disk and GPU load; still no queueing, stalls or slot loads,
so no strategy that does not know the future reaches a lower p99.
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import compare_policies_sim as cps
from loragate.core.errors import ConfigError
from loragate.core.types import VLLM_LORA_RANKS
from loragate.simulate import ReplicaEngineSettings
from loragate.twin.profile import load_profile
from loragate.workload import Workload


class Lru:
    """Keys in least-recently-used-first order."""

    __slots__ = ("cap", "keys")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.keys: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self.keys

    def victim(self) -> int | None:
        """The key the next miss evicts (None while there is room)."""
        return next(iter(self.keys)) if len(self.keys) >= self.cap else None

    def touch(self, key: int) -> tuple[bool, int | None]:
        """Use ``key``: (was it a miss, the key evicted)."""
        if key in self.keys:
            self.keys.move_to_end(key)
            return False, None
        evicted = self.victim()
        if evicted is not None:
            del self.keys[evicted]
        self.keys[key] = None
        return True, evicted


class Replica:
    """GPU slots inside a CPU cache, both LRU; ``pinned`` adapters never leave the CPU cache."""

    __slots__ = ("cpu", "gpu", "pinned")

    def __init__(self, gpu: int, cpu: int, pinned: frozenset[int] = frozenset()) -> None:
        self.gpu = Lru(gpu)
        self.cpu = Lru(cpu - len(pinned))
        self.pinned = pinned

    def holds(self, a: int) -> bool:
        return a in self.pinned or a in self.cpu

    def touch(self, a: int) -> tuple[bool, bool]:
        """Serve adapter ``a``: (disk load, GPU load)."""
        disk = False
        if a not in self.pinned:
            disk, evicted = self.cpu.touch(a)
            if evicted is not None:
                self.gpu.keys.pop(evicted, None)
        gpu, _ = self.gpu.touch(a)
        return disk, gpu


def snake(n_adapters: int, replicas: int) -> list[int]:
    """Adapter i (popularity rank) -> replica, dealt in snake order (balanced traffic)."""
    out = []
    for i in range(n_adapters):
        block, pos = divmod(i, replicas)
        out.append(pos if block % 2 == 0 else replicas - 1 - pos)
    return out


Chooser = Callable[[int, int, list[Replica]], int]


def replay(seq: Sequence[int], reps: list[Replica], choose: Chooser) -> tuple[int, int]:
    disk = gpu = 0
    for t, a in enumerate(seq):
        d, g = reps[choose(t, a, reps)].touch(a)
        disk += d
        gpu += g
    return disk, gpu


def holders_then(victim_key: Callable[[Replica], float]) -> Chooser:
    """A replica holding ``a`` (GPU first, then CPU; lowest index), else the min of
    ``victim_key`` (a replica with room first)."""

    def choose(t: int, a: int, reps: list[Replica]) -> int:
        for i, r in enumerate(reps):
            if a in r.gpu:
                return i
        for i, r in enumerate(reps):
            if r.holds(a):
                return i
        return min(range(len(reps)), key=lambda i: victim_key(reps[i]))

    return choose


def belady(seq: Sequence[int], cap: int) -> int:
    """Misses of the offline-optimal cache of ``cap`` entries (evict the farthest next use)."""
    never = len(seq)
    nxt = [never] * len(seq)
    seen: dict[int, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = seen.get(seq[i], never)
        seen[seq[i]] = i
    cache: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key); stale entries skipped
    misses = 0
    for i, a in enumerate(seq):
        if a not in cache:
            misses += 1
            if len(cache) >= cap:
                while True:
                    neg, b = heapq.heappop(heap)
                    if cache.get(b) == -neg:
                        del cache[b]
                        break
        cache[a] = nxt[i]
        heapq.heappush(heap, (-nxt[i], a))
    return misses


def a0_misses(seq: Sequence[int], cap: int) -> int:
    """Misses of A0 on one cache of ``cap`` entries: adapters ``0 .. cap-2`` (the most requested,
    as ``adapter_stream`` names them) pinned after their first use, one LRU entry for the rest."""
    pinned = cap - 1
    seen: set[int] = set()
    last = -1
    misses = 0
    for a in seq:
        if a < pinned:
            if a not in seen:
                seen.add(a)
                misses += 1
        elif a != last:
            last = a
            misses += 1
    return misses


def adapter_stream(setup: cps.Setup, rate: float, duration_s: float, seed: int) -> list[int]:
    """The adapters of the table's request stream (base requests left out), each named by its
    popularity rank in this stream (0 = most requested): the static strategies are oracles."""
    wl = Workload(cps.make_spec(setup, rate_rps=rate, duration_s=duration_s, seed=seed))
    names = [r.adapter for r in wl.requests() if r.adapter is not None]
    counts = Counter(names)
    rank = {a: i for i, (a, _) in enumerate(counts.most_common())}
    return [rank[a] for a in names]


def load_bounds(
    seq: Sequence[int], n_adapters: int, replicas: int, gpu: int, cpu: int
) -> dict[str, tuple[int, int]]:
    """(disk loads, GPU loads) per strategy for one stream."""
    part = snake(n_adapters, replicas)
    last_use: dict[int, int] = {}
    uses: dict[int, int] = {}

    def fresh(pins: Sequence[frozenset[int]] = ()) -> list[Replica]:
        return [Replica(gpu, cpu, pins[i] if pins else frozenset()) for i in range(replicas)]

    def lru_age(r: Replica) -> float:
        v = r.cpu.victim()
        return -1.0 if v is None else float(last_use.get(v, -1))

    def lfu_count(r: Replica) -> float:
        v = r.cpu.victim()
        return -1.0 if v is None else float(uses.get(v, 0))

    def tracked(choose: Chooser) -> Chooser:
        def inner(t: int, a: int, reps: list[Replica]) -> int:
            i = choose(t, a, reps)
            last_use[a] = t
            uses[a] = uses.get(a, 0) + 1
            return i

        return inner

    n_pinned = min(n_adapters, replicas * (cpu - 1))
    pins = [frozenset(a for a in range(n_pinned) if part[a] == i) for i in range(replicas)]
    out = {
        "round_robin": replay(seq, fresh(), lambda t, a, reps: t % replicas),
        "partition": replay(seq, fresh(), lambda t, a, reps: part[a]),
        "holders+lru": replay(seq, fresh(), tracked(holders_then(lru_age))),
    }
    last_use.clear()
    uses.clear()
    out["holders+lfu"] = replay(seq, fresh(), tracked(holders_then(lfu_count)))

    def pinned_home(t: int, a: int, reps: list[Replica]) -> int:
        if a < n_pinned:
            return part[a]
        held = [i for i, r in enumerate(reps) if a in r.cpu]
        return held[0] if held else t % replicas

    out["pinned"] = replay(seq, fresh(pins), pinned_home)
    out["pooled_a0"] = (a0_misses(seq, replicas * cpu), a0_misses(seq, replicas * gpu))
    d = belady(seq, replicas * cpu)
    out["belady"] = (d, belady(seq, replicas * gpu))
    return out


def ttft_floor(setup: cps.Setup, rate: float, duration_s: float, seed: int) -> np.ndarray:
    """TTFT of every request alone on an idle replica, its adapter already in a GPU slot."""
    wl = Workload(cps.make_spec(setup, rate_rps=rate, duration_s=duration_s, seed=seed))
    need = max([a.rank for a in wl.adapters] or [1])
    max_rank = min(r for r in VLLM_LORA_RANKS if r >= need)  # what the simulator sets
    prof = load_profile(setup.profile).specialize(max_loras=setup.max_loras, max_lora_rank=max_rank)
    chunk = ReplicaEngineSettings().max_num_batched_tokens
    memo: dict[tuple[int, int], float] = {}
    out = []
    for r in wl.requests():
        left, t = r.prompt_tokens, 0.0
        while left > 0:
            c = min(left, chunk)
            left -= c
            key = (c, r.rank)
            step = memo.get(key)
            if step is None:
                step = memo[key] = prof.step_time_s(
                    batch_size=1,
                    distinct_adapters=1 if r.adapter is not None else 0,
                    prefill_tokens=c,
                    decode_tokens=0,
                    max_rank_in_batch=r.rank,
                    num_waiting=0,
                    lora_enabled=True,
                )
            t += step
        out.append(t)
    return np.array(out)


def request_costs(
    setup: cps.Setup, rate: float, duration_s: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request of the stream: its TTFT alone (``ttft_floor``), its adapter (popularity
    rank in the stream, as ``adapter_stream`` names them; -1 for the base model) and what a
    cold start adds to it (disk->CPU then CPU->GPU load of its rank, inside its first step)."""
    floor = ttft_floor(setup, rate, duration_s, seed)
    wl = Workload(cps.make_spec(setup, rate_rps=rate, duration_s=duration_s, seed=seed))
    prof = load_profile(setup.profile)
    reqs = list(wl.requests())
    counts = Counter(r.adapter for r in reqs if r.adapter is not None)
    rank = {a: i for i, (a, _) in enumerate(counts.most_common())}
    adapter = np.array([rank[r.adapter] if r.adapter is not None else -1 for r in reqs])
    cold = np.array(
        [
            prof.disk_to_cpu_load_s(r.rank) + prof.cpu_to_gpu_load_s(r.rank)
            if r.adapter is not None
            else 0.0
            for r in reqs
        ]
    )
    return floor, adapter, cold


def cold_floor_p99(
    floor: np.ndarray, adapter: np.ndarray, cold: np.ndarray, n_adapters: int, capacity: int
) -> float:
    """The lowest TTFT p99 a strategy can reach when the replicas' CPU caches hold at most
    ``capacity`` adapters in all, each request taking at least its ``floor`` and, if its
    adapter is in no CPU cache, its ``cold`` load on top (queueing and stalls left out).

    The smallest ``x`` such that at most 1% of the requests take longer than ``x`` under the
    best choice of cached adapters for that ``x``: keeping adapter ``a`` out of every cache adds
    its requests with ``floor <= x < floor + cold`` to those above ``x``; the cheapest
    ``n_adapters - capacity`` are left out. Under the independent reference model the same set
    is the best at every moment for any strategy, placement and pre-warming included (only the
    past is known and the next request's adapter does not depend on it), so this bounds every
    non-clairvoyant strategy; popularity is the stream's own (an oracle)."""
    n = len(floor)
    out = max(0, n_adapters - capacity)
    has = adapter >= 0
    idx = np.where(has, adapter, 0)
    allowed = 0.01 * n

    def above(x: float) -> float:
        hit = floor > x
        extra = (floor + cold > x) & ~hit & has
        cost = np.bincount(idx[extra], minlength=n_adapters)
        return float(hit.sum() + np.sort(cost)[:out].sum())

    lo, hi = 0.0, float((floor + cold).max())
    for _ in range(60):  # above() falls as x grows: bisect to ~1e-18 of the range
        mid = (lo + hi) / 2
        if above(mid) <= allowed:
            hi = mid
        else:
            lo = mid
    return hi


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cps.add_deployment_args(ap)
    ap.add_argument("--rate-rps", type=float, default=7.175, help="the item-8 table's rate")
    ap.add_argument("--floor", action="store_true", help="also the TTFT floor (slower)")
    args = ap.parse_args(argv)
    setup = cps.Setup.from_args(args, ttft_slo_ms=1000.0)
    try:
        cps.check_setup(setup)
    except ConfigError as exc:
        print(f"routing_bounds.py: error: {exc}", file=sys.stderr)
        return 2
    seeds = range(1, args.seeds + 1)
    n_adapters = len(Workload(cps.make_spec(setup, rate_rps=1.0, duration_s=1.0, seed=1)).adapters)
    per_seed: dict[str, list[tuple[int, int, int]]] = {}
    for seed in seeds:
        seq = adapter_stream(setup, args.rate_rps, args.duration_s, seed)
        bounds = load_bounds(seq, n_adapters, args.replicas, args.max_loras, args.max_cpu_loras)
        for name, (n_disk, n_gpu) in bounds.items():
            per_seed.setdefault(name, []).append((len(seq), n_disk, n_gpu))
    wl = Path(args.workload).stem + (f" (zipf s={args.zipf_s:g})" if args.zipf_s else "")
    print(
        f"{wl}, {args.replicas} replicas x (max_loras {args.max_loras}, max_cpu_loras "
        f"{args.max_cpu_loras}), {args.rate_rps:g} req/s, {args.duration_s:g} s, seeds "
        f"{list(seeds)} (means)\n"
    )
    head = f"{'strategy':14} {'disk loads':>11} {'of requests':>12} {'gpu loads':>10} "
    head += f"{'adapter loads':>14} {'x round_robin':>14}"
    print(head)
    print("-" * len(head))
    base_rows = per_seed["round_robin"]
    base = statistics.fmean(d + g for _, d, g in base_rows)
    for name, rows in per_seed.items():
        disk = statistics.fmean(d for _, d, _ in rows)
        gpu = statistics.fmean(g for _, _, g in rows)
        frac = statistics.fmean(d / n for n, d, _ in rows)
        print(
            f"{name:14} {disk:11.0f} {frac:12.1%} {gpu:10.0f} {disk + gpu:14.0f} "
            f"{(disk + gpu) / base:14.2f}"
        )
    a0 = [
        (d + g) / (rd + rg)
        for (_, d, g), (_, rd, rg) in zip(per_seed["pooled_a0"], base_rows, strict=True)
    ]
    verdict = "reachable" if min(a0) <= cps.LOADS_RATIO else "not reachable"
    print(
        f"\nonline optimum (pooled_a0) per seed: {', '.join(f'{r:.3f}' for r in a0)} x "
        f"round_robin's adapter loads; item 8 asks for <= {cps.LOADS_RATIO:.3f}: {verdict} "
        "without knowing future requests (or holding requests back to batch them)"
    )
    if args.floor:
        p99s, p50s, cold99s = [], [], []
        for seed in seeds:
            t, adapter, cold = request_costs(setup, args.rate_rps, args.duration_s, seed)
            p99s.append(float(np.quantile(t, 0.99)))
            p50s.append(float(np.quantile(t, 0.5)))
            capacity = args.replicas * args.max_cpu_loras
            cold99s.append(cold_floor_p99(t, adapter, cold, n_adapters, capacity))
        print(
            f"\nTTFT floor (each request alone, adapter in a GPU slot, profile "
            f"{args.profile}): p50 {statistics.fmean(p50s) * 1e3:.0f} ms, p99 "
            f"{statistics.fmean(p99s) * 1e3:.0f} ms "
            f"({', '.join(f'{p * 1e3:.0f}' for p in p99s)})"
        )
        print(
            f"TTFT p99 floor with cold loads (each request alone; at most "
            f"{args.replicas * args.max_cpu_loras} adapters in the CPU caches, the best set for "
            f"the p99; a request whose adapter is in none pays its disk and GPU load): "
            f"{statistics.fmean(cold99s) * 1e3:.0f} ms "
            f"({', '.join(f'{p * 1e3:.0f}' for p in cold99s)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
