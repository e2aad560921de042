"""Cost of one routing decision, per built-in policy (issue 4 item 9: <= 50 µs p50).

Run::

    .venv/bin/python bench/routing_cost.py                 # 16 replicas, 1,000 adapters
    .venv/bin/python bench/routing_cost.py --replicas 64 --decisions 20000 --check

Each decision is ``policy.choose(request, snapshots, policy.context(now_s))`` on prebuilt
snapshots of a busy cluster: every replica has ``max_loras`` 8 GPU slots and 32 CPU-cache
entries filled, ~250 registered adapters, tens of requests in flight over ~12 adapters, and
metrics (running, waiting, deferred, KV usage); requests draw adapters from a Zipf(1.0)
popularity over all adapters. 64 different cluster states are cycled through so caches keyed
on state do not flatter the numbers. Timing is ``perf_counter_ns`` around each call, after a
warm-up; p50/p99 are printed per policy. ``--check`` exits 1 if any p50 exceeds the budget.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from types import MappingProxyType

from loragate.core.types import ReplicaSettings, ReplicaSnapshot, Residency, RoutingRequest
from loragate.routing import build_policy, default_registry

BUDGET_P50_US = 50.0


def _zipf_weights(n: int, s: float = 1.0) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def make_cluster(
    rng: random.Random, adapters: list[str], weights: list[float], replicas: int
) -> list[ReplicaSnapshot]:
    settings = ReplicaSettings(max_loras=8, max_cpu_loras=32, max_num_seqs=256)
    out = []
    for i in range(replicas):
        reg = rng.sample(adapters, 250)
        cpu = tuple(reg[:32])
        gpu = cpu[-8:]
        in_flight = rng.randint(0, 300)
        running_adapters = rng.choices(adapters, weights=weights, k=12)
        per_adapter = {a: rng.randint(1, 20) for a in running_adapters}
        waiting = rng.randint(0, 20)
        out.append(
            ReplicaSnapshot(
                replica_id=f"replica-{i}",
                url=f"http://10.0.0.{i}:8000",
                settings=settings,
                num_running=min(in_flight, 256),
                num_waiting=waiting,
                num_deferred=rng.randint(0, waiting),
                kv_usage=rng.random() * 0.9,
                active_adapters=frozenset(list(per_adapter)[:8]),
                waiting_adapters=frozenset(list(per_adapter)[:8]),
                in_flight=in_flight,
                adapter_in_flight=MappingProxyType(per_adapter),
                residency=Residency(registered=frozenset(reg), gpu=gpu, cpu=cpu),
                healthy=rng.random() > 0.02,
            )
        )
    return out


def measure(
    name: str, clusters: list[list[ReplicaSnapshot]], requests: list[RoutingRequest], n: int
) -> tuple[float, float]:
    policy = build_policy(name, seed=0)
    warm = min(2000, n)
    for i in range(warm):
        policy.choose(requests[i % len(requests)], clusters[i % len(clusters)], policy.context())
    samples = []
    perf = time.perf_counter_ns
    gc.disable()
    try:
        for i in range(n):
            req = requests[i % len(requests)]
            cluster = clusters[i % len(clusters)]
            t0 = perf()
            policy.choose(req, cluster, policy.context(float(i)))
            samples.append(perf() - t0)
    finally:
        gc.enable()
    samples.sort()
    return samples[len(samples) // 2] / 1000.0, samples[int(len(samples) * 0.99)] / 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="exit 1 if a p50 is over budget")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    adapters = [f"lora-{i}" for i in range(args.adapters)]
    weights = _zipf_weights(args.adapters)
    clusters = [make_cluster(rng, adapters, weights, args.replicas) for _ in range(64)]
    requests = [
        RoutingRequest(
            request_id=f"req-{i}",
            adapter=a,
            prompt_tokens=rng.randint(16, 2000),
            max_tokens=rng.randint(16, 1000),
            adapter_rank=rng.choice((8, 16, 32)),
        )
        for i, a in enumerate(rng.choices(adapters, weights=weights, k=4096))
    ]
    print(
        f"routing cost: {args.replicas} replicas, {args.adapters} adapters, "
        f"{args.decisions} decisions per policy (python {sys.version.split()[0]})"
    )
    print(f"{'policy':<18}{'p50 µs':>10}{'p99 µs':>10}  budget p50 <= {BUDGET_P50_US:g} µs")
    over = []
    for name in default_registry().profiles:
        p50, p99 = measure(name, clusters, requests, args.decisions)
        ok = p50 <= BUDGET_P50_US
        if not ok:
            over.append(name)
        print(f"{name:<18}{p50:>10.1f}{p99:>10.1f}  {'ok' if ok else 'OVER'}")
    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
