"""``loragate demo``: simulated replicas + the gateway on loopback, driven by a mixed workload.

Everything runs in this process on 127.0.0.1 with embedded in-memory state: no Redis, no GPU.

The replicas' context (``max_model_len``) fits the workload: vLLM's default 4096, or more when
the workload's longest request (prompt + output, plus what the chat template adds around a
message) needs it, so that a trace's long prompts are served, not refused (a spec's
``max_total_tokens: 4096`` bounds the prompt's words and the output, and a chat's template adds
3 tokens: 4098 tokens against a 4096 context). Every request sent within ``--duration`` gets
its full request timeout (60 s) to finish: the run ends when the last one does. The exit status
is 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loragate.commands.simulate import policy_from_arg
from loragate.core.config import GatewayConfig, RoutingConfig
from loragate.core.config import ReplicaConfig as GatewayReplica
from loragate.core.errors import ConfigError
from loragate.core.types import AdapterSpec, ReplicaSettings
from loragate.gateway.runner import RunningGateway, running_gateway
from loragate.loadtest.openloop import OpenLoopConfig, RequestResult, run_open_loop
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica
from loragate.twin.synthetic_text import PromptFormat
from loragate.workload.generator import Workload
from loragate.workload.parse import load_spec, spec_from_mapping
from loragate.workload.spec import WorkloadSpec

HELP = "Run simulated replicas and the gateway on loopback and drive a mixed workload through it."

BASE_MODEL = "demo-base"

# How long one request may take (the load test's default); the run waits that long after the
# last request is sent.
REQUEST_TIMEOUT_S = 60.0

# The shell's status of a process stopped by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130

# 12 adapters (ranks 8 and 16) with skewed popularity, bursty arrivals, some base-model
# traffic: more adapters than the replicas' GPU slots, so placement and routing matter.
DEMO_WORKLOAD: Mapping[str, Any] = {
    "name": "demo",
    "seed": 7,
    "duration_s": 30,
    "adapters": {
        "count": 12,
        "name_pattern": "lora-{i}",
        "ranks": {8: 0.5, 16: 0.5},
        "popularity": {"kind": "zipf", "s": 0.9},
        "base_fraction": 0.1,
    },
    "arrivals": {"process": "gamma", "cv": 1.5, "rate_rps": 12},
    "lengths": {
        "prompt": {"kind": "lognormal", "mean": 96, "sigma": 0.6, "min": 8, "max": 512},
        "output": {"kind": "lognormal", "mean": 48, "sigma": 0.6, "min": 4, "max": 128},
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    parser.add_argument("--replicas", type=int, default=3, help="simulated replicas (3)")
    parser.add_argument(
        "--policy",
        default="loragate",
        help="routing policy: round_robin, least_loaded, consistent_hash, lora_affinity, "
        "lru_multiplex or loragate, or a YAML file with a routing: mapping as `loragate "
        "simulate --policy` takes, e.g. one of examples/policies/ (loragate)",
    )
    parser.add_argument("--max-loras", type=int, default=2, help="GPU LoRA slots per replica (2)")
    parser.add_argument(
        "--max-cpu-loras", type=int, default=4, help="CPU LoRA cache per replica (4)"
    )
    parser.add_argument("--profile", default="fast", help="twin performance profile (fast)")
    parser.add_argument(
        "--workload",
        type=Path,
        help="workload spec YAML (default: built in, 12 adapters at 12 req/s)",
    )
    parser.add_argument(
        "--traces-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="a copy of the traces the spec reads: its relative file paths are looked for "
        "under DIR first, by their trailing parts (../../shared/traces/x/y.csv as "
        "DIR/shared/traces/x/y.csv, DIR/traces/x/y.csv, DIR/x/y.csv, DIR/y.csv), then beside "
        "the spec (default: $LORAGATE_TRACES_DIR)",
    )
    parser.add_argument("--rate", type=float, help="override the workload's total req/s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the replicas and routing (0)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoSummary:
    policy: str  # the routing policy's name (a policy file's own name, not its path)
    requests: int
    succeeded: int
    errors: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    output_tokens: int
    duration_s: float
    replicas: tuple[dict[str, Any], ...]
    max_model_len: int  # the replicas' context (``context_for``)
    error_samples: tuple[str, ...]


def run(args: argparse.Namespace) -> int:
    if args.duration <= 0:
        raise SystemExit("loragate demo: --duration must be > 0")
    if not 1 <= args.replicas <= 8:
        raise SystemExit("loragate demo: --replicas must be between 1 and 8")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        policy = policy_from_arg(args.policy)
        spec = (
            load_spec(args.workload, traces_dir=args.traces_dir)
            if args.workload
            else spec_from_mapping(DEMO_WORKLOAD)
        )
        spec = replace(spec, duration_s=args.duration)
        if args.rate is not None:
            spec = replace(spec, arrivals=replace(spec.arrivals, rate_rps=args.rate))
        console = Console(stderr=args.json)
        summary = asyncio.run(_demo(args, spec, policy, console))
    except ConfigError as exc:  # a bad --policy, --profile, --workload or slot count
        print(f"loragate demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: asyncio.run has cancelled the run and closed the servers
        print("loragate demo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(asdict(summary), indent=2))
    else:
        _print_summary(console, summary, args)
    return 0 if summary.errors == 0 and summary.requests > 0 else 1


def context_for(workload: Workload, fmt: PromptFormat) -> int:
    """The replicas' ``max_model_len`` for ``workload``: vLLM's default (4096), or the longest
    request's prompt + output plus the tokens the model's tokenizer and chat template add around
    a prompt (a BOS; a chat's message and generation prompt), if more."""
    longest = max(
        (int((b.prompt_tokens + b.max_tokens).max()) for b in workload.batches() if len(b.t_s)),
        default=0,
    )
    added = max(int(fmt.add_bos), fmt.chat_prompt_tokens([""]))
    return max(ReplicaConfig().max_model_len, longest + added)


def write_adapter_dirs(root: Path, adapters: Sequence[AdapterSpec]) -> tuple[AdapterSpec, ...]:
    """Create one PEFT-style adapter folder per adapter (config only: the twin needs no weights)."""
    return tuple(
        AdapterSpec(
            name=a.name,
            path=write_adapter_folder(
                str(root / a.name), rank=a.rank, base_model_name_or_path=BASE_MODEL
            ),
            rank=a.rank,
        )
        for a in adapters
    )


async def _demo(
    args: argparse.Namespace,
    spec: WorkloadSpec,
    policy: str | Mapping[str, Any],
    console: Console,
) -> DemoSummary:
    workload = Workload(spec)
    max_model_len = context_for(workload, ReplicaConfig().prompt_format)
    with tempfile.TemporaryDirectory(prefix="loragate-demo-") as tmp:
        adapters = write_adapter_dirs(Path(tmp), workload.adapters)
        settings = ReplicaSettings(
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_lora_rank=max(16, max(a.rank for a in adapters)),
            max_num_seqs=64,
        )
        replica_cfgs = [
            ReplicaConfig(
                served_model_name=BASE_MODEL,
                enable_lora=True,
                max_loras=settings.max_loras,
                max_cpu_loras=settings.max_cpu_loras,
                max_lora_rank=settings.max_lora_rank,
                max_num_seqs=settings.max_num_seqs,
                max_model_len=max_model_len,
                profile=args.profile,
                seed=args.seed + i,
            )
            for i in range(args.replicas)
        ]
        async with contextlib.AsyncExitStack() as stack:
            replicas: list[RunningReplica] = [
                await stack.enter_async_context(run_replica(cfg, host="127.0.0.1", port=0))
                for cfg in replica_cfgs
            ]
            config = GatewayConfig(
                base_model=BASE_MODEL,
                replicas=tuple(
                    GatewayReplica(replica_id=f"r{i}", url=r.url, settings=settings)
                    for i, r in enumerate(replicas)
                ),
                adapters=adapters,
                routing=RoutingConfig(spec=policy, seed=args.seed),
            )
            async with running_gateway(config, host="127.0.0.1", port=0) as gateway:
                results, elapsed_s = await _drive(args, workload, gateway, console)
                return _summarise(results, elapsed_s, gateway, replicas, max_model_len)


async def _drive(
    args: argparse.Namespace, workload: Workload, gateway: RunningGateway, console: Console
) -> tuple[list[RequestResult], float]:
    cfg = OpenLoopConfig(
        base_url=gateway.url + "/v1",
        base_model=BASE_MODEL,
        max_concurrency=256,
        # Every request sent (within --duration) gets its own timeout to finish: a request cut
        # by the run's deadline would count as failed though nothing went wrong.
        deadline_s=args.duration + REQUEST_TIMEOUT_S + 5.0,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    done = [0, 0]  # succeeded, failed
    loop = asyncio.get_running_loop()
    start = loop.time()
    progress = Progress(
        TextColumn("[bold]demo[/]"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
        transient=False,
    )
    with progress:
        task = progress.add_task("load", total=args.duration, status="starting")

        def on_result(r: RequestResult) -> None:
            done[0 if r.ok else 1] += 1
            progress.update(
                task,
                completed=min(args.duration, loop.time() - start),
                status=f"{done[0]} ok, {done[1]} errors",
            )

        async def tick() -> None:
            while True:
                await asyncio.sleep(0.25)
                progress.update(task, completed=min(args.duration, loop.time() - start))

        ticker = asyncio.create_task(tick())
        try:
            results = await run_open_loop(cfg, workload.requests(), on_result=on_result)
        finally:
            ticker.cancel()
        progress.update(task, completed=args.duration)
    return results, loop.time() - start


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100.0 * len(ordered)) - 1)
    return ordered[rank]


def _summarise(
    results: Sequence[RequestResult],
    elapsed_s: float,
    gateway: RunningGateway,
    replicas: Sequence[RunningReplica],
    max_model_len: int,
) -> DemoSummary:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    lats = [r.latency_s * 1000 for r in ok]
    gw = gateway.gateway
    admin_loads = gw.pool.adapter_loads()
    per_replica = []
    for rid, rep in zip(gw.pool.replica_ids, replicas, strict=True):
        engine = rep.state.engine
        per_replica.append(
            {
                "replica": rid,
                "requests": sum(rep.state.counters.success_by_reason.values()),
                "adapter_loads": admin_loads.get(rid, 0),
                "gpu_swaps": engine.loads_from_memory,
                "disk_loads": engine.loads_from_disk,
            }
        )
    errors = [r.error or f"HTTP {r.status}" for r in results if not r.ok]
    return DemoSummary(
        policy=gw.policy.name,
        requests=len(results),
        succeeded=len(ok),
        errors=len(errors),
        ttft_p50_ms=_percentile(ttfts, 50),
        ttft_p99_ms=_percentile(ttfts, 99),
        latency_p50_ms=_percentile(lats, 50),
        latency_p99_ms=_percentile(lats, 99),
        output_tokens=sum(r.output_tokens for r in ok),
        duration_s=elapsed_s,
        replicas=tuple(per_replica),
        max_model_len=max_model_len,
        error_samples=tuple(sorted(set(errors))[:5]),
    )


def _print_summary(console: Console, s: DemoSummary, args: argparse.Namespace) -> None:
    table = Table(title=f"loragate demo: {args.replicas} simulated replicas, policy {s.policy}")
    for col in ("requests", "errors", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99", "tok/s"):
        table.add_column(col, justify="right")
    table.add_row(
        str(s.requests),
        str(s.errors),
        f"{s.ttft_p50_ms:.1f} ms",
        f"{s.ttft_p99_ms:.1f} ms",
        f"{s.latency_p50_ms:.1f} ms",
        f"{s.latency_p99_ms:.1f} ms",
        f"{s.output_tokens / s.duration_s:.0f}",
    )
    console.print(table)
    per = Table(title="per replica")
    for col in ("replica", "requests", "admin loads", "GPU swaps", "disk loads"):
        per.add_column(col, justify="right")
    for r in s.replicas:
        per.add_row(
            r["replica"],
            str(r["requests"]),
            str(r["adapter_loads"]),
            str(r["gpu_swaps"]),
            str(r["disk_loads"]),
        )
    console.print(per)
    console.print(f"replicas' context (max_model_len): {s.max_model_len} tokens")
    for sample in s.error_samples:
        console.print(f"[red]error:[/] {sample}")
