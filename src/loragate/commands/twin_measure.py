"""``loragate twin measure``: measure your own vLLM (your hardware, your model) into a calibration
folder that ``loragate twin calibrate`` fits a profile from.

    loragate twin measure --model my-model --out calib/ --adapter /adapters/r8 \\
        --adapter /adapters/r16 --vllm-command 'vllm serve MODEL --enable-lora \\
        --max-loras {max_loras} --max-cpu-loras {max_cpu_loras} \\
        --max-lora-rank {max_lora_rank} --max-num-seqs {max_num_seqs} --port {port}'
    loragate twin calibrate --data calib/ --model my-model --out my-model.yaml
    loragate simulate --profile my-model.yaml ...

The sweeps and the CSV columns are those of ``data/tiny-llama-cpu`` (the same code measured
it, ``bench/calibrate_vllm_cpu.py``); the command template is ``twin.measure_template``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from loragate.core.errors import ConfigError

PARTS = ("base", "lora", "loading")
# Exit status of a process stopped by SIGTERM (128 + 15).
EXIT_TERMINATED = 143


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_measure_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "measure",
        help="measure your vLLM into a calibration folder for `twin calibrate`",
        description="Start your vLLM server (--vllm-command, a template) with the settings "
        "each calibration sweep needs, measure decode, prefill, LoRA and adapter-load "
        "costs, and write the calibration CSVs that `loragate twin calibrate --data OUT` "
        "fits a profile from. Servers run one at a time on 127.0.0.1; each is stopped "
        "before the next starts.",
    )
    p.add_argument(
        "--vllm-command",
        required=True,
        help="the server command, with the placeholders {port}, {max_loras}, "
        "{max_cpu_loras}, {max_lora_rank} and {max_num_seqs}, e.g. 'vllm serve MODEL "
        "--enable-lora --max-loras {max_loras} --max-cpu-loras {max_cpu_loras} "
        "--max-lora-rank {max_lora_rank} --max-num-seqs {max_num_seqs} --port {port}'; "
        "split like a shell line, run without a shell (prefix `env NAME=VALUE` for "
        "environment variables)",
    )
    p.add_argument(
        "--vllm-base-command",
        default=None,
        help="the server without LoRA (placeholders {port}, {max_num_seqs}; default: "
        "--vllm-command without --enable-lora and the options holding LoRA placeholders)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="a peft LoRA adapter folder the server can read (rank from its "
        "adapter_config.json); repeat for more ranks; one folder per rank is enough "
        "(it is registered under several names)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model name written into the CSVs (pass it to `twin calibrate --model`)",
    )
    p.add_argument("--out", required=True, help="calibration folder to write")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="comma list of base, lora, loading (default: all; `twin calibrate` needs all "
        "three, parts not run keep their files in --out)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small plan (one repetition, fewer batch sizes; minutes, not an hour): to "
        "check the setup, or a rough profile",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3, --quick 1)")
    p.add_argument(
        "--decode-batches", type=_ints, default=None, help="e.g. 1,2,4,8,16,32 (the default)"
    )
    p.add_argument("--lora-batches", type=_ints, default=None, help="e.g. 8,16,32 (the default)")
    p.add_argument(
        "--lora-distinct",
        type=_ints,
        default=None,
        help="distinct adapters per batch, e.g. 1,2,4,8,16 (the default; the largest is the "
        "LoRA server's max_loras)",
    )
    p.add_argument(
        "--ready-timeout-s",
        type=float,
        default=600.0,
        help="seconds each server may take to answer /health (default: %(default)s)",
    )
    p.set_defaults(_twin=run_measure)


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ConfigError(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}", key="--parts")
    return parts


@contextmanager
def _sigterm_stops_servers() -> Iterator[None]:
    """SIGTERM -> SystemExit, so the running server is stopped by the sweeps' finally blocks
    (each server runs in its own session: it would outlive a killed measure)."""

    def stop(_sig: int, _frame: FrameType | None) -> None:
        sys.exit(EXIT_TERMINATED)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_measure(args: argparse.Namespace) -> int:
    from loragate.twin.measure_csv import write_calibration
    from loragate.twin.measure_rows import Labels
    from loragate.twin.measure_sweeps import CalibrationPlan, Measurement, run_calibration
    from loragate.twin.measure_template import (
        BASE_PLACEHOLDERS,
        PLACEHOLDERS,
        CommandTemplate,
        TemplateLauncher,
        adapter_set,
    )

    parts = _parts(args.parts)
    command = CommandTemplate.parse(
        args.vllm_command, option="--vllm-command", required=PLACEHOLDERS
    )
    base_command = (
        CommandTemplate.parse(
            args.vllm_base_command, option="--vllm-base-command", required=BASE_PLACEHOLDERS
        )
        if args.vllm_base_command is not None
        else command.without_lora()
    )
    adapters = adapter_set(args.adapter)
    ranks = tuple(sorted(adapters))
    plan = CalibrationPlan.quick() if args.quick else CalibrationPlan()
    plan = dataclasses.replace(
        plan, lora_ranks=ranks[:1] if args.quick else ranks, loading_ranks=ranks
    )
    for field, value in (
        ("reps", args.reps),
        ("decode_batches", args.decode_batches),
        ("lora_batches", args.lora_batches),
        ("lora_distinct", args.lora_distinct),
    ):
        if value is not None:
            plan = dataclasses.replace(plan, **{field: value})
    if plan.reps < 1:
        raise ConfigError("must be at least 1", key="--reps")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out}: {exc.strerror or exc}", key="--out") from exc
    launcher = TemplateLauncher(
        command=command,
        base_command=base_command,
        log_dir=out / "logs",
        ready_timeout_s=args.ready_timeout_s,
    )

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    m = Measurement(
        launcher=launcher,
        adapters=adapters,
        labels=Labels(model=args.model, source="loragate twin measure", group_prefix="measured"),
        log=log,
    )
    log(
        f"measuring {', '.join(parts)}: {plan.run_count(parts)} timed runs, adapter ranks "
        f"{', '.join(map(str, ranks))}, server logs in {out / 'logs'}"
    )
    t0 = time.monotonic()
    with _sigterm_stops_servers():
        tables = run_calibration(plan, m, parts)
    write_calibration(out, tables, parts)
    (out / "measurement.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "parts": parts,
                "vllm_command": args.vllm_command,
                "vllm_base_command": args.vllm_base_command,
                "adapters": {str(r): [str(p) for p in ps] for r, ps in adapters.items()},
                "plan": dataclasses.asdict(plan),
                "duration_s": round(time.monotonic() - t0, 1),
                "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "loadavg_1m": os.getloadavg()[0],
            },
            indent=2,
        )
        + "\n"
    )
    written = ", ".join(f"{k}.csv" for k, v in tables.items() if v and "/" not in k)
    print(f"wrote {out} ({written}) in {time.monotonic() - t0:.0f} s")
    print(f"next: loragate twin calibrate --data {out} --model {args.model} --out PROFILE.yaml")
    return 0
