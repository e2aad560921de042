"""Measure real vLLM (CPU build) on this machine: calibration sweeps + validation runs for the
digital twin's ``tiny-llama-cpu`` profile.

    bash scripts/vllm_cpu_env.sh                      # once: venv + tiny model + adapters
    .venv/bin/python bench/calibrate_vllm_cpu.py      # all parts -> data/tiny-llama-cpu/
    .venv/bin/python bench/calibrate_vllm_cpu.py --parts validation --window-s 60
    .venv/bin/python bench/calibrate_vllm_cpu.py --quick --out /tmp/calib-smoke

Writes (same columns as shared/data/bsc-vllm-lora/, plus documented extras):
  calibration/{base_latency,lora_overhead,loading,kv_capacity}.csv, calibration/raw/*.csv,
  validation/real_runs.csv, validation/requests.csv. Parts that are not run keep their files.
See data/tiny-llama-cpu/README.md for the setup and the meaning of the extra columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loragate.twin.measure_csv import merge_csv, read_csv, write_calibration
from loragate.twin.measure_rows import Labels
from loragate.twin.measure_sweeps import CalibrationPlan, Measurement, run_calibration
from vllm_cpu.replica import EnvLauncher, adapter_dirs, env_problem, work_dir_from_env
from vllm_cpu.validation import SCENARIOS, run_validation

REPO = Path(__file__).resolve().parents[1]
PARTS = ("base", "lora", "loading", "validation", "prefill")  # prefill: redo only those rows
LABELS = Labels(model="tiny-llama-cpu", source="bench/calibrate_vllm_cpu.py")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "tiny-llama-cpu")
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="real-vLLM env (default $LORAGATE_VLLM_DIR or /tmp/loragate-vllm)",
    )
    ap.add_argument("--parts", default=",".join(PARTS[:4]), help=f"comma list of {PARTS}")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    ap.add_argument(
        "--window-s",
        type=float,
        default=None,
        help="validation window per run (default per scenario, 90 s)",
    )
    ap.add_argument("--scenarios", default="", help="comma list of validation scenario names")
    ap.add_argument("--quick", action="store_true", help="tiny plan for a smoke test")
    ap.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="scheduling priority of the servers and of this client (default -10; "
        "needs root, else 0 is used)",
    )
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS}")
    wanted = {s for s in a.scenarios.split(",") if s}
    names = [s.name for s in SCENARIOS]
    unknown = sorted(wanted - set(names))
    if unknown:  # else the validation part ran none of them and said "done"
        ap.error(f"unknown scenario(s) {unknown}; choose from {names}")
    work_dir = a.work_dir or work_dir_from_env()
    problem = env_problem(work_dir)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    nice = a.nice  # the vLLM servers are children of this process and inherit it
    if nice < 0:
        try:
            os.nice(nice)
        except PermissionError:
            _log(f"cannot raise priority (nice {nice}) without root; measuring at nice 0")
            nice = 0
    # SIGTERM -> SystemExit, so the running replica is stopped by the finally blocks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = CalibrationPlan.quick() if a.quick else CalibrationPlan()
    if a.reps is not None:
        plan = dataclasses.replace(plan, reps=a.reps)
    t_start = time.monotonic()
    _log(f"parts={parts} out={a.out} work_dir={work_dir} nice={nice} argv={sys.argv[1:]}")
    calib = [p for p in parts if p != "validation"]
    if calib:
        folder = a.out / "calibration"
        old_base = read_csv(folder / "base_latency.csv")
        m = Measurement(
            launcher=EnvLauncher(work_dir=work_dir),
            adapters=adapter_dirs(work_dir),
            labels=LABELS,
            log=_log,
        )
        tables = run_calibration(plan, m, calib, base_rows=old_base)
        write_calibration(folder, tables, calib)
        _log(
            f"calibration written ({', '.join(k for k, v in tables.items() if v)}); "
            f"kv rows -> {folder / 'kv_capacity.csv'}"
        )
    if "validation" in parts:
        scs = [s for s in SCENARIOS if not wanted or s.name in wanted]
        window = a.window_s if a.window_s is not None else (20.0 if a.quick else None)
        rows, reqs = run_validation(work_dir, _log, scs, window_s=window)
        merge_csv(a.out / "validation" / "real_runs.csv", rows, key="run_id")
        merge_csv(a.out / "validation" / "requests.csv", reqs, key="run_id")
    _log(f"done in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
