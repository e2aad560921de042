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
import csv
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_cpu.calibration import CalibrationPlan, run_calibration
from vllm_cpu.replica import env_problem, work_dir_from_env
from vllm_cpu.runner import Row
from vllm_cpu.validation import SCENARIOS, run_validation

REPO = Path(__file__).resolve().parents[1]
PARTS = ("base", "lora", "loading", "validation", "prefill")  # prefill: redo only those rows


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_fmt(r.get(c)) for c in cols])


def merge_csv(path: Path, rows: Sequence[Row], key: str) -> None:
    """Write ``rows``, keeping the rows of an existing file whose ``key`` is not re-measured."""
    new_keys = {str(r.get(key)) for r in rows}
    kept: list[Row] = []
    if path.exists():
        with open(path, newline="") as f:
            kept = [dict(r) for r in csv.DictReader(f) if r.get(key) not in new_keys]
    write_csv(path, [*kept, *rows])


def read_csv(path: Path) -> list[Row]:
    if not path.exists():
        return []
    out: list[Row] = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: Row = {}
            for k, v in r.items():
                try:
                    row[k] = int(v) if v.lstrip("-").isdigit() else float(v) if v else None
                except ValueError:
                    row[k] = v
            out.append(row)
    return out


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
        old_base = read_csv(a.out / "calibration" / "base_latency.csv")
        tables = run_calibration(plan, work_dir, _log, calib, base_rows=old_base)
        kv_path = a.out / "calibration" / "kv_capacity.csv"
        for name, rows in tables.items():
            if name == "kv_capacity":
                merge_csv(kv_path, rows, key="group")
            elif (
                rows
                and name.startswith(("base_latency", "raw/base_latency"))
                and "base" not in calib
            ):
                merge_csv(a.out / "calibration" / f"{name}.csv", rows, key="phase")
            elif rows:
                write_csv(a.out / "calibration" / f"{name}.csv", rows)
        _log(
            f"calibration written ({', '.join(k for k, v in tables.items() if v)}); "
            f"kv rows -> {kv_path}"
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
