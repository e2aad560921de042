"""Read a calibration folder (BSC CSV format) into plain numeric rows.

The folder layout is the one of ``shared/data/bsc-vllm-lora/calibration/``:
``base_latency.csv``, ``lora_overhead.csv``, ``loading.csv`` (plus each run's median ITL from
its raw ``openai-*.json`` below ``raw/<source_path>`` where the CSV lacks it),
``kv_capacity.csv`` and, optionally, scheduler-overhead runs (``scheduler_overhead.csv`` in the
folder, or the two R3 CSVs ``metrics_data_{aggregated_rate,adapter_rates}.csv`` anywhere below
it) and single-request runs over (max_loras, max_lora_rank) (``slot_sweep.csv``, or the R7
sweep's ``openai-*.json`` results below
``find_available_gpu_memory_depending_on_loaded_adapters/<model>/``). Every file and every
non-key column is optional: a missing value reads as ``nan`` and the fitter skips the row or
falls back to another source. Only the ``model`` column is used to filter rows. The folder's
other models are loaded alongside (``peers``): the R3 runs do not name their model.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loragate.core.errors import ConfigError

Row = dict[str, float]

BASE_LATENCY_FILE = "base_latency.csv"
LORA_OVERHEAD_FILE = "lora_overhead.csv"
LOADING_FILE = "loading.csv"
KV_CAPACITY_FILE = "kv_capacity.csv"
SCHEDULER_FILE = "scheduler_overhead.csv"
SLOT_SWEEP_FILE = "slot_sweep.csv"
# The R7 start-up sweep over (max_loras, max_lora_rank): one base-model request per server, so
# its ITL is a one-sequence step of a LoRA-enabled engine with every slot empty.
R7_DIR = "find_available_gpu_memory_depending_on_loaded_adapters"
_R7_RUN = re.compile(r"^_(\d+)_(\d+)_$")
R3_FILES = ("metrics_data_aggregated_rate.csv", "metrics_data_adapter_rates.csv")

# Text columns kept as strings (everything else is parsed as float, '' / 'fail' -> nan).
_TEXT_COLUMNS = frozenset(
    {"group", "model", "phase", "max_num_seqs_source", "source_path", "fail_reason", "source"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Table:
    """Rows of one CSV file: numeric columns in ``values``, text columns in ``text``."""

    values: list[Row] = field(default_factory=list)
    text: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.values)

    def column(self, name: str) -> list[float]:
        return [row.get(name, math.nan) for row in self.values]


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationData:
    """All tables of one calibration folder, already filtered to one model."""

    model: str
    base_latency: Table
    lora_overhead: Table
    loading: Table
    kv_capacity: Table
    scheduler: Table
    # Rows of the other models (used only for documented fallbacks, e.g. prefill weight).
    base_latency_all: Table
    # One-request runs of LoRA-enabled servers over (max_loras, max_lora_rank): columns
    # max_loras, max_lora_rank, itl_mean_ms, completed (``slot_sweep.csv`` or the R7 folders).
    slot_sweep: Table = field(default_factory=Table)
    # The other models of the same folder, each loaded as above (without peers of its own):
    # R3 does not name its model, and the fit decides from their R6 swap times which one it was.
    peers: dict[str, CalibrationData] = field(default_factory=dict)


def _to_float(text: str) -> float:
    text = text.strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_table(path: Path, *, model: str | None = None) -> Table:
    """Read one CSV; keep rows whose ``model`` column equals ``model`` (if both exist)."""
    if not path.is_file():
        return Table()
    values: list[Row] = []
    text: list[dict[str, str]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            row_model = raw.get("model")
            if model is not None and row_model not in (None, "", model):
                continue
            values.append({k: _to_float(v) for k, v in raw.items() if k and k not in _TEXT_COLUMNS})
            text.append({k: (v or "") for k, v in raw.items() if k and k in _TEXT_COLUMNS})
    return Table(values=values, text=text)


def _concat(tables: list[Table]) -> Table:
    return Table(
        values=[row for t in tables for row in t.values],
        text=[row for t in tables for row in t.text],
    )


def _scheduler_table(folder: Path, model: str) -> Table:
    direct = folder / SCHEDULER_FILE
    if direct.is_file():
        return read_table(direct, model=model)
    found = [p for name in R3_FILES for p in sorted(folder.rglob(name))]
    # R3 runs do not name their model (scheduling is CPU-side and model-agnostic). Each row
    # keeps its file as ``source``: the two sweeps ran on differently behaving servers.
    tables = [read_table(p) for p in found]
    for p, table in zip(found, tables, strict=True):
        for text in table.text:
            text["source"] = text.get("source") or p.name
    return _concat(tables)


# Where the raw copies of the runs of a CSV row live (``<folder>/raw/<source_path>``).
RAW_DIR = "raw"


def _openai_results(run_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The benchmark results (``openai-*.json``) of one run folder, in name order, parsed;
    files that cannot be read or are not a JSON object are skipped."""
    if not run_dir.is_dir():
        return
    for result in sorted(run_dir.glob("openai-*.json")):
        try:
            raw = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict):
            yield result, raw


def _loading_table(folder: Path, model: str) -> Table:
    """``loading.csv`` with each run's median ITL (``itl_median_ms``) from its raw result.

    The packaged R6 rows carry the client's mean ITL only; the run's ``openai-*.json`` (raw
    copy below ``raw/<source_path>``) also holds the median. A column of the CSV wins.
    """
    table = read_table(folder / LOADING_FILE, model=model)
    for values, text in zip(table.values, table.text, strict=True):
        if math.isfinite(values.get("itl_median_ms", math.nan)) or not text.get("source_path"):
            continue
        for _, raw in _openai_results(folder / RAW_DIR / text["source_path"]):
            median = raw.get("median_itl_ms")
            if isinstance(median, int | float) and math.isfinite(median):
                values["itl_median_ms"] = float(median)
                break
    return table


def _slot_sweep_table(folder: Path, model: str) -> Table:
    direct = folder / SLOT_SWEEP_FILE
    if direct.is_file():
        return read_table(direct, model=model)
    values: list[Row] = []
    text: list[dict[str, str]] = []
    for model_dir in sorted(folder.rglob(f"{R7_DIR}/{model}")):
        for run_dir in sorted(model_dir.iterdir()):
            match = _R7_RUN.match(run_dir.name)
            if match is None:
                continue
            for result, raw in _openai_results(run_dir):
                itl = raw.get("mean_itl_ms")
                if not isinstance(itl, int | float) or not raw.get("completed"):
                    continue
                values.append(
                    {
                        "max_loras": float(match.group(1)),
                        "max_lora_rank": float(match.group(2)),
                        "itl_mean_ms": float(itl),
                        "completed": float(raw["completed"]),
                    }
                )
                text.append({"model": model, "source_path": str(result.relative_to(folder))})
    return Table(values=values, text=text)


def available_models(folder: Path) -> list[str]:
    """Model names present in the folder's ``base_latency.csv`` / ``lora_overhead.csv``."""
    names: set[str] = set()
    for name in (BASE_LATENCY_FILE, LORA_OVERHEAD_FILE, KV_CAPACITY_FILE):
        for row in read_table(folder / name).text:
            if row.get("model"):
                names.add(row["model"])
    return sorted(names)


def load_calibration_data(
    folder: str | Path, model: str, *, with_peers: bool = True
) -> CalibrationData:
    """Load every table of ``folder`` for ``model``; raise ConfigError if nothing matches.

    ``with_peers`` also loads the folder's other models (``CalibrationData.peers``).
    """
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"calibration folder not found: {path}")
    data = CalibrationData(
        model=model,
        base_latency=read_table(path / BASE_LATENCY_FILE, model=model),
        lora_overhead=read_table(path / LORA_OVERHEAD_FILE, model=model),
        loading=_loading_table(path, model),
        kv_capacity=read_table(path / KV_CAPACITY_FILE, model=model),
        scheduler=_scheduler_table(path, model),
        base_latency_all=read_table(path / BASE_LATENCY_FILE),
        slot_sweep=_slot_sweep_table(path, model),
    )
    if not len(data.base_latency) and not len(data.lora_overhead):
        known = ", ".join(available_models(path)) or "none"
        raise ConfigError(f"no calibration rows for model {model!r} in {path} (models: {known})")
    if not with_peers:
        return data
    peers: dict[str, CalibrationData] = {}
    for other in available_models(path):
        if other == model:
            continue
        try:
            peers[other] = load_calibration_data(path, other, with_peers=False)
        except ConfigError:  # listed only in kv_capacity.csv: nothing to fit
            continue
    return replace(data, peers=peers)
