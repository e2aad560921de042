"""``loragate simulate``: N twin replicas behind a routing policy, in virtual time.

What ``--out`` writes (records, ``summary.json``) and what each field means:
:mod:`loragate.simulate.outputs`. ``--rate-rps`` and ``--adapters`` change the workload
(:mod:`loragate.workload.overrides`); ``--sweep`` runs a grid of deployments and names the
smallest that meets the SLO target (:mod:`loragate.simulate.sweep`, its output
:mod:`loragate.simulate.sweep_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from loragate.core.errors import ConfigError, LoragateError
from loragate.routing import build_policy
from loragate.simulate import (
    RecordWriter,
    ReplicaEngineSettings,
    Simulation,
    SimulationConfig,
    sweep,
)
from loragate.simulate.config import KvCapacityError, is_demo_profile, profile_label
from loragate.simulate.outputs import claim, write_summary
from loragate.simulate.records import CONTEXT_LENGTH, RecordFormat
from loragate.simulate.summary import SLOT_BOUND_SHARE, STARVATION_RATIO, slot_bound
from loragate.simulate.sweep import MAX_POINTS
from loragate.simulate.sweep_report import sweep_lines, sweep_result
from loragate.workload import SpecFileError, Workload, load_spec
from loragate.workload.overrides import (
    naming_the_adapter_flag,
    trace_notes,
    with_adapter_count,
    with_total_rate,
)
from loragate.workload.yaml_file import load_yaml_with_lines, naming_file, read_text_file

# --slo-attainment's default: the share of requests a sweep's point must serve within the SLO.
SLO_ATTAINMENT = 0.99
# Flags that only a sweep uses (argparse dest, flag, why): refused in a single run.
_SWEEP_ONLY = (
    (
        "slo_attainment",
        "--slo-attainment",
        " (a single run has no target to meet: its summary prints the share it attained, "
        "'TTFT SLO <ms> attained by <share>')",
    ),
    ("jobs", "--jobs", ""),
    ("progress", "--progress", ""),
)

HELP = "Simulate a deployment (twin replicas + routing policy) on a workload, in virtual time."

# The shell's status of a process stopped by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM stopped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", required=True, metavar="W.yaml", help="workload spec")
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
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="simulated vLLM replicas (required, unless --sweep replicas=...)",
    )
    parser.add_argument(
        "--profile",
        default="fast",
        help="twin profile name (loragate twin profiles) or YAML path (default: %(default)s); "
        "fast is the demo profile, hand-set and calibrated on no hardware: to size a "
        "deployment pass a calibrated one, e.g. llama-3.1-8b-h100",
    )
    parser.add_argument(
        "--policy",
        default="round_robin",
        help="routing policy name (round_robin, least_loaded, consistent_hash, lora_affinity, "
        "lru_multiplex, loragate) or a YAML file with a routing: mapping, e.g. one of "
        "examples/policies/ (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, help="default: the workload's seed")
    parser.add_argument("--duration-s", type=float, default=None, help="override the spec's")
    parser.add_argument(
        "--rate-rps",
        type=float,
        default=None,
        metavar="R",
        help="scale the spec's rates so that its mean total rate is R req/s (its shape in time "
        "kept; a ServeGen replay: every window's count scaled by one factor)",
    )
    parser.add_argument(
        "--adapters",
        type=int,
        default=None,
        metavar="N",
        help="N adapters instead of the spec's adapters.count, sharing the same total rate by "
        "the spec's popularity law; a ServeGen replay: its N busiest (select: top) or N "
        "sampled clients, at their traced rates (add --rate-rps to fix the total); refused "
        "for specs that list their adapters",
    )
    parser.add_argument(
        "--ttft-slo-ms",
        type=float,
        default=1000.0,
        help="TTFT target for the SLO attainment figure (default: %(default)s)",
    )
    parser.add_argument(
        "--starvation-wait-s",
        type=float,
        default=60.0,
        help="a request waiting longer than this for its first token counts as starved "
        "(default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="write records.{csv,jsonl} and, when the run completes, summary.json here",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's records and summary.json in --out (without it, a run "
        "refuses such a directory; other files there are never touched)",
    )
    parser.add_argument(
        "--records",
        choices=("csv", "jsonl"),
        default="csv",
        help="format of the per-request records under --out (default: %(default)s)",
    )
    parser.add_argument(
        "--scrape-interval-s",
        type=float,
        default=0.0,
        help="engine metrics refresh period seen by routing (0 = fresh at every arrival; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=600.0,
        help="virtual time allowed after the workload to finish requests (default: %(default)s)",
    )
    sw = parser.add_argument_group(
        "sizing (--sweep)",
        "Run the workload on every point of a grid and name the smallest point (fewest "
        "replicas, then max_loras, then max_cpu_loras) whose SLO attainment (--ttft-slo-ms) "
        "is at least --slo-attainment without throughput starvation. Every point replays the "
        "same requests (the seed); one table row per point.",
    )
    sw.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="an axis of the grid: replicas, max_loras or max_cpu_loras (repeatable; the "
        "values replace --replicas / --max-loras / --max-cpu-loras; points with "
        f"max_cpu_loras < max_loras are left out; at most {MAX_POINTS} points)",
    )
    sw.add_argument(
        "--slo-attainment",
        type=float,
        default=None,
        metavar="A",
        help=f"share of requests that must meet --ttft-slo-ms (default: {SLO_ATTAINMENT:g}; "
        "only with --sweep: a single run prints the share it attained)",
    )
    sw.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes for the points (0 = all cores, the default)",
    )
    sw.add_argument("--progress", action="store_true", help="one line per finished point (stderr)")
    e = parser.add_argument_group("replica (vLLM) settings")
    e.add_argument("--max-loras", type=int, default=4, help="default: %(default)s")
    e.add_argument("--max-cpu-loras", type=int, default=8, help="default: %(default)s")
    e.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help="one of vLLM's 1, 8, 16, 32, 64, 128, 256, 320, 512; default: the smallest that "
        "fits the workload's largest adapter rank",
    )
    e.add_argument("--max-num-seqs", type=int, default=256, help="default: %(default)s")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048, help="default: %(default)s")
    e.add_argument("--max-model-len", type=int, default=4096, help="default: %(default)s")
    e.add_argument(
        "--kv-capacity-tokens",
        type=int,
        default=None,
        help="default: the profile's KV memory model",
    )


def policy_from_arg(arg: str) -> str | dict[str, Any]:
    """``--policy``'s value: a built-in policy's name, or a YAML file holding a name or a
    composed ``routing:`` section (``simulate`` and ``demo`` alike), or a gateway config file
    (its ``routing:`` is taken).

    The file is read as a gateway config file is (``workload.yaml_file``'s strict reader: a
    key written twice, nesting deeper than any policy needs and YAML syntax errors are refused
    at their line) and the policy built once, so every problem is one line naming the file,
    the line and column, and the key (``p.yaml:3:7: routing.filters[0]: unknown filter ...``).
    """
    path = Path(arg)
    if not _is_policy_file(arg):
        return arg
    try:
        text = read_text_file(path, "policy file")
    except ConfigError as exc:
        raise ConfigError(str(exc), key="policy") from exc
    data, lines = load_yaml_with_lines(text, arg)
    if isinstance(data, dict) and "routing" in data:
        data, what = data["routing"], "routing"
    else:  # the whole file is the routing section: its keys are named as under routing:
        lines = {"": lines.get("", (1, 1)), **{_under_routing(k): at for k, at in lines.items()}}
        what = None
    with naming_file(arg, lines):
        if not isinstance(data, str | dict):
            raise ConfigError(
                f"a policy file holds a policy name or a routing mapping, got "
                f"{'null' if data is None else type(data).__name__}",
                key=what,
            )
        build_policy(data)  # validate now: unknown names and keys, its size
    return data


def _is_policy_file(arg: str) -> bool:
    """Whether ``--policy``'s value names a file (else it is a built-in policy's name)."""
    return arg.endswith((".yaml", ".yml")) or Path(arg).is_file()


def _with_files(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The summary's ``config`` with the files the run read, each beside what it gave, and
    the workload's settings the command line changed."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        out[key] = value
        if key == "workload":
            out["workload_file"] = args.workload
            out["workload_overrides"] = {
                "rate_rps": args.rate_rps,
                "adapters": args.adapters,
                "duration_s": args.duration_s,
                "seed": args.seed,
            }
        elif key == "policy":
            out["policy_file"] = args.policy if _is_policy_file(args.policy) else None
    return out


def _under_routing(key: str) -> str:
    """A key of a policy file that is a bare routing section, as build_policy names it."""
    return f"routing{key}" if not key or key.startswith("[") else f"routing.{key}"


def config_from_args(args: argparse.Namespace, *, replicas: int | None = None) -> SimulationConfig:
    """The run's settings; ``replicas`` stands in for ``--replicas`` (a sweep's)."""
    if replicas is None:
        if args.replicas is None:
            raise ConfigError(
                "required: how many replicas to simulate (or --sweep replicas=N1,N2,...)",
                key="--replicas",
            )
        replicas = args.replicas
    return SimulationConfig(
        replicas=replicas,
        profile=args.profile,
        policy=policy_from_arg(args.policy),
        engine=ReplicaEngineSettings(
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_lora_rank=args.max_lora_rank,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            kv_capacity_tokens=args.kv_capacity_tokens,
        ),
        seed=args.seed,
        ttft_slo_ms=args.ttft_slo_ms,
        starvation_wait_s=args.starvation_wait_s,
        scrape_interval_s=args.scrape_interval_s,
        drain_s=args.drain_s,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms" if isinstance(v, float) else str(v)


def _print_text(summary: dict[str, Any]) -> None:
    req = summary["requests"]
    tp = summary["throughput"]
    cfg = summary["config"]
    eng = cfg["engine"]
    policy = cfg["policy"]
    if cfg.get("policy_file"):
        policy += f" from {cfg['policy_file']}"
    print(
        f"{cfg['workload']}: {_count(cfg['replicas'], 'replica')} (max_loras {eng['max_loras']}, "
        f"max_cpu_loras {eng['max_cpu_loras']}, max_lora_rank {eng['max_lora_rank']}), "
        f"policy {policy} (routing sha256 {cfg['routing']['sha256'][:12]}), "
        f"profile {profile_label(cfg['profile'])}, seed {cfg['seed']}"
    )
    reasons = req["rejected_by_reason"]
    why = f" ({', '.join(f'{k} {v}' for k, v in reasons.items())})" if reasons else ""
    print(
        f"requests {req['total']} (ok {req['ok']}, rejected {req['rejected']}{why}, "
        f"unfinished {req['unfinished']}); arrived {tp['arrivals_per_s']:.3g}/s "
        f"(spec: {cfg['offered_rate_rps']:.3g}/s)"
    )
    if reasons.get(CONTEXT_LENGTH):
        print(
            f"  {reasons[CONTEXT_LENGTH]} requests are longer than --max-model-len "
            f"{cfg['engine']['max_model_len']} (prompt + max_tokens): vLLM refuses them; "
            "lengths.max_total_tokens in the spec caps them"
        )
    keeps_up = (
        f"cluster throughput STARVED (achieved < {STARVATION_RATIO:g} x offered)"
        if summary["starved"]
        else f"cluster throughput keeps up (achieved >= {STARVATION_RATIO:g} x offered)"
    )
    print(
        f"tokens/s achieved {tp['achieved_tokens_per_s']:.1f} of "
        f"{tp['offered_tokens_per_s']:.1f} offered: {keeps_up}"
    )
    for name in ("ttft_s", "itl_s", "e2e_s"):
        s = summary[name]
        print(f"{name[:-2].upper():5} p50 {_fmt(s['p50'])}  p99 {_fmt(s['p99'])}")
    slo = summary["slo"]
    att = slo["attainment"]
    print(f"TTFT SLO {slo['ttft_ms']:g} ms attained by {'-' if att is None else f'{att:.1%}'}")
    loads = [(r, v["adapter_loads"]) for r, v in summary["replicas"].items()]
    per_replica = ", ".join(f"{r} {n}" for r, n in loads)
    deferred = summary["deferred"]
    waited = (
        f" ({deferred['fraction']:.1%} of those served; {deferred['share_of_ttft']:.0%} of "
        "their time to first token was waiting for a LoRA slot)"
        if deferred["requests"]
        else ""
    )
    print(
        f"adapter loads {sum(n for _, n in loads)} ({per_replica}); "
        f"deferred requests {deferred['requests']}{waited}"
    )
    for line in _bottleneck_hints(summary):
        print(f"  {line}")
    st = summary["starvation"]
    starved = (
        f"{st['requests']} ({st['fraction']:.2%}), of {st['adapters']} adapters"
        if st["requests"]
        else "none"
    )
    print(f"starved requests (first token after > {st['wait_s']:g} s, or never): {starved}")
    print(f"simulated {summary['duration_s']:g} s in {summary['wall_s']:.2f} s wall")


def _demo_profile_note(name: str) -> None:
    if is_demo_profile(name):
        print(
            f"loragate simulate: note: profile {name} is the demo and test profile (hand-set "
            "~2 ms steps, calibrated on no hardware): its latencies and capacities size no "
            "real deployment; for sizing pass --profile llama-3.1-8b-h100, qwen-2.5-7b-h100, "
            "tiny-llama-cpu or your own (loragate twin profiles)",
            file=sys.stderr,
        )


def _bottleneck_hints(summary: dict[str, Any]) -> list[str]:
    """What to change first when the run is short of LoRA slots or of throughput."""
    if summary["starved"]:
        return [
            "throughput-starved: the replicas cannot keep up with the offered tokens: add "
            "replicas (more LoRA slots take KV memory and can make this worse)"
        ]
    if slot_bound(summary):
        return [
            f"slot-bound (>= {SLOT_BOUND_SHARE:.0%} of the time to first token is waiting for a "
            "LoRA slot): to cut TTFT, raise --max-loras (with --max-cpu-loras >= it) before "
            "adding replicas; "
            "compare with --sweep max_loras=A,B --sweep replicas=N,M"
        ]
    return []


# Settings that come from command-line flags: their errors name the flag.
_FLAG_KEYS = frozenset(
    {
        "replicas",
        "profile",
        "seed",
        "ttft_slo_ms",
        "starvation_wait_s",
        "scrape_interval_s",
        "drain_s",
        "max_loras",
        "max_cpu_loras",
        "max_lora_rank",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
        "kv_capacity_tokens",
    }
)


def _as_flag(exc: LoragateError) -> str:
    """``max_lora_rank: ...`` -> ``--max-lora-rank: ...`` for errors in command-line settings
    (errors in the workload file start with the file instead)."""
    if isinstance(exc, KvCapacityError):
        return _kv_capacity_message(exc)
    text = str(exc)
    if isinstance(exc, SpecFileError) or not isinstance(exc, ConfigError):
        return text
    key = exc.key
    if key in _FLAG_KEYS and text.startswith(f"{key}: "):
        return f"--{key.replace('_', '-')}: {text[len(key) + 2 :]}"
    return text


def _kv_capacity_message(exc: KvCapacityError) -> str:
    """:class:`KvCapacityError` in the flags that decide the KV cache's size."""
    if exc.given_tokens is not None:
        source = f"--kv-capacity-tokens {exc.given_tokens}"
        fixes = "raise --kv-capacity-tokens"
    else:
        source = (
            f"profile {exc.profile}'s KV memory model for --max-loras {exc.max_loras} x "
            f"--max-lora-rank {exc.max_lora_rank}"
        )
        fixes = (
            "give --kv-capacity-tokens, a --profile with more KV memory, or lower --max-loras "
            "x --max-lora-rank (LoRA slots take KV memory)"
        )
    return (
        f"--max-model-len: {exc.max_model_len} tokens do not fit in a replica's KV cache "
        f"({exc.kv_tokens} tokens, from {source}): lower --max-model-len, or {fixes}"
    )


def _cannot_write(path: Path, exc: OSError) -> ConfigError:
    reason = exc.strerror or str(exc)
    blocking = next((d for d in [path, *path.parents] if d.exists() and not d.is_dir()), None)
    if blocking is not None:  # mkdir's own "File exists" would not say which one
        reason = f"{blocking} is not a directory"
    return ConfigError(f"cannot write {path}: {reason}", key="--out")


def _workload(args: argparse.Namespace) -> Workload:
    """The workload spec with the command line's changes (``--duration-s``, ``--seed``,
    ``--adapters``, ``--rate-rps``), its notes said on stderr."""
    if args.duration_s is not None and not args.duration_s > 0:
        raise ConfigError(f"must be > 0, got {args.duration_s:g}", key="--duration-s")
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"must be >= 0, got {args.seed}", key="--seed")
    spec = load_spec(args.workload, traces_dir=args.traces_dir)
    if args.duration_s is not None:
        spec = dataclasses.replace(spec, duration_s=args.duration_s)
    if args.seed is not None:
        spec = dataclasses.replace(spec, seed=args.seed)
    given = spec
    if args.adapters is not None:
        spec = with_adapter_count(spec, args.adapters)
    with naming_the_adapter_flag(args.adapters):  # a trace with fewer clients names the flag
        if args.rate_rps is not None:
            spec = with_total_rate(spec, args.rate_rps)
        workload = Workload(spec)
    changed = trace_notes(given, workload, adapters=args.adapters, rate_rps=args.rate_rps)
    for note in [*workload.notes, *changed]:
        print(f"loragate simulate: note: {args.workload}: {note}", file=sys.stderr)
    return workload


def _simulate(args: argparse.Namespace) -> dict[str, Any]:
    for attr, flag, why in _SWEEP_ONLY:  # silently ignored before
        if getattr(args, attr) not in (None, False):
            raise ConfigError(f"used only with --sweep{why}", key=flag)
    writer: RecordWriter | None = None
    config = config_from_args(args)
    workload = _workload(args)
    simulation = Simulation(workload, config)  # every setting checked before --out is touched
    try:
        if args.out is not None:
            fmt: RecordFormat = args.records
            path = args.out / f"records.{fmt}"
            try:
                claim(args.out, overwrite=args.overwrite)
                writer = RecordWriter(path, fmt)
            except OSError as exc:
                raise _cannot_write(path, exc) from exc
        _demo_profile_note(simulation.profile.name)
        summary = simulation.run(writer.write if writer else None).summary
    finally:
        if writer is not None:
            writer.close()
    summary["config"] = _with_files(summary["config"], args)
    if args.out is not None:
        try:
            write_summary(args.out, summary)
        except OSError as exc:
            raise _cannot_write(args.out / "summary.json", exc) from exc
    return summary


def _sweep(args: argparse.Namespace) -> dict[str, Any]:
    """``--sweep``: every point's summary, the table's rows and the smallest point meeting the
    target (:mod:`loragate.simulate.sweep`)."""
    axes = sweep.parse_axes(args.sweep)
    if args.out is not None:
        raise ConfigError(
            "not used with --sweep (--json prints every point's summary)", key="--out"
        )
    if "replicas" in axes and args.replicas is not None:
        raise ConfigError("not used with --sweep replicas=...", key="--replicas")
    slo_attainment = SLO_ATTAINMENT if args.slo_attainment is None else args.slo_attainment
    jobs = 0 if args.jobs is None else args.jobs
    if not 0 < slo_attainment <= 1:
        raise ConfigError(f"must be in (0, 1], got {slo_attainment:g}", key="--slo-attainment")
    if jobs < 0:
        raise ConfigError(f"must be >= 0, got {jobs}", key="--jobs")
    base = config_from_args(args, replicas=axes["replicas"][0] if "replicas" in axes else None)
    workload = _workload(args)
    points, left_out = sweep.grid(axes, base)
    sims = sweep.prepare(workload, base, points)
    _demo_profile_note(sims[0].profile.name)
    wall0 = time.perf_counter()

    def progress(n: int, total: int, point: sweep.Point, elapsed_s: float) -> None:
        print(
            f"loragate simulate: [{n}/{total}] {point.label()} done ({elapsed_s:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    def result(
        at: list[sweep.Point], summaries: list[dict[str, Any]], of: int | None = None
    ) -> dict[str, Any]:
        for summary in summaries:
            summary["config"] = _with_files(summary["config"], args)
        return sweep_result(
            axes,
            at,
            summaries,
            slo_attainment=slo_attainment,
            left_out=left_out,
            jobs=jobs,
            wall_s=time.perf_counter() - wall0,
            of_points=of,
        )

    try:
        summaries = sweep.run_points(
            sims, points, jobs=jobs, progress=progress if args.progress else None
        )
    except sweep.SweepInterrupted as exc:  # the points done are printed, not lost
        if exc.done:
            exc.result = result([points[i] for i, _ in exc.done], [s for _, s in exc.done],
                                len(points))  # fmt: skip
        raise
    return result(points, summaries)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a job runner's stop), handled as Ctrl-C is."""


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _error_text(exc: LoragateError) -> str:
    if isinstance(exc, sweep.PointConfigError):
        return f"--sweep at {exc.point.label()}: {_as_flag(exc.cause)}"
    return _as_flag(exc)


def run(args: argparse.Namespace) -> int:
    try:
        with _sigterm_as_ctrl_c():
            result = _sweep(args) if args.sweep else _simulate(args)
    except LoragateError as exc:
        print(f"loragate simulate: error: {_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (or SIGTERM) in a long run: no traceback
        cause = exc.__cause__ if isinstance(exc, sweep.SweepInterrupted) else exc
        code = EXIT_TERMINATED if isinstance(cause, _Terminated) else EXIT_INTERRUPTED
        if isinstance(exc, sweep.SweepInterrupted) and exc.result is not None:
            # A sweep's finished points: their table (or JSON), as a whole sweep prints it.
            lines = [json.dumps(exc.result, indent=2)] if args.json else sweep_lines(exc.result)
            print("\n".join(lines), flush=True)
            done = exc.result["sweep"]["interrupted"]
            print(
                f"loragate simulate: {done['points_done']} of {done['points']} points done "
                "(their table is on stdout)",
                file=sys.stderr,
            )
        partial = f" ({args.out}/records.{args.records} is incomplete)" if args.out else ""
        print(f"loragate simulate: interrupted{partial}", file=sys.stderr)
        return code
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.sweep:
        print("\n".join(sweep_lines(result)))
    else:
        _print_text(result)
    return 0
