"""Write measured rows as CSV files (columns in first-seen order, floats to 6 significant
digits, None as empty) and merge re-measured rows into an existing folder."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from loragate.twin.measure_runner import Row


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


def read_csv(path: Path) -> list[Row]:
    """Rows of a CSV written by :func:`write_csv` (numbers parsed, '' as None); [] if absent."""
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


def merge_csv(path: Path, rows: Sequence[Row], key: str) -> None:
    """Write ``rows``, keeping the rows of an existing file whose ``key`` is not re-measured."""
    new_keys = {str(r.get(key)) for r in rows}
    kept: list[Row] = []
    if path.exists():
        with open(path, newline="") as f:
            kept = [dict(r) for r in csv.DictReader(f) if r.get(key) not in new_keys]
    write_csv(path, [*kept, *rows])


def write_calibration(
    folder: Path, tables: Mapping[str, Sequence[Row]], parts: Sequence[str]
) -> None:
    """Write ``run_calibration``'s tables into ``folder`` (the calibration folder that
    ``loragate twin calibrate --data`` reads). Tables of parts not run keep their files; the
    KV rows are merged by ``group``; re-measured prefill rows alone are merged by ``phase``."""
    kv_path = folder / "kv_capacity.csv"
    for name, rows in tables.items():
        if name == "kv_capacity":
            merge_csv(kv_path, rows, key="group")
        elif rows and name.startswith(("base_latency", "raw/base_latency")) and "base" not in parts:
            merge_csv(folder / f"{name}.csv", rows, key="phase")
        elif rows:
            write_csv(folder / f"{name}.csv", rows)
