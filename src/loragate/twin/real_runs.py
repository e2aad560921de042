"""A runs file (``validation/real_runs.csv``) read into the runs to replay (:class:`RunSpec`).

Each row names one real vLLM run: its engine settings, its served adapters' rates and ranks, the
requests it sent and what the server accounted for, its measured quantities. Rows that cannot be
replayed as they stand (a required column empty or unreadable, adapter counts or ranks that
contradict the run's settings, flag ``served_adapters_mismatch``) are skipped with the reason;
model names are matched loosely (``meta-llama/Llama-3.1-8B-Instruct`` is
``llama-3.1-8b-instruct``); optional columns may be empty or absent (each fallback is noted on
the run).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loragate.core.errors import ConfigError

# The data set's models (canonical_model() knows the names of both tables).
# Model-default max_model_len of the validation models (the servers ran with the default).
MODEL_MAX_LEN: dict[str, int] = {
    "llama-3.1-8b-instruct": 131072,
    "qwen-2.5-7b-instruct": 32768,
}
# Fitted profile used for each model of the data set unless --profile overrides it.
DEFAULT_PROFILES: dict[str, str] = {
    "llama-3.1-8b-instruct": "llama-3.1-8b-h100",
    "qwen-2.5-7b-instruct": "qwen-2.5-7b-h100",
    "tiny-llama-cpu": "tiny-llama-cpu",
}
# Rows with these flags are skipped (the data README's meaning of each). Other flags (e.g.
# ``folder_name_mismatch``: the folder's name disagrees with the launcher, whose settings the
# row holds) are replayed and the flag is shown on the run.
EXCLUDED_FLAGS: dict[str, str] = {
    "served_adapters_mismatch": "the benchmark found a different number of adapters on the "
    "server than the launcher configured (it measured another server)",
}
# vLLM 0.8.5's start-up check (the version of the BSC runs): --max-lora-rank must be one of
# these (vllm/config.py, LoRAConfig). vLLM 0.32, which the simulated replica speaks, also
# accepts 1 (core.types.VLLM_LORA_RANKS).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """The configuration of one real run, as needed to replay it."""

    run_id: str
    model: str
    workload: str
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    ranks: tuple[int, ...]  # rank of each served adapter
    rates_rps: tuple[float, ...]  # nominal rate of each served adapter (before shuffling)
    requests_sent: int | None
    mean_prompt_tokens: float
    mean_output_tokens: float
    real_window_s: float = 3600.0  # the window requests_sent was counted over
    # Optional (exact replays of runs that recorded every request; None: ValidateConfig's /
    # the model's defaults).
    max_num_seqs: int | None = None
    token_budget: int | None = None
    max_model_len: int | None = None
    requests_path: str = ""  # requests.csv with this run's requests: replayed exactly
    adapters_in_gpu_at_start: bool = True  # False: registered into the CPU cache only
    # What the row says about the requests the server saw (offered_requests(), "accounted"):
    # successful_requests + max_running + max_waiting, and max_waiting alone (None: empty).
    accounted_requests: int | None = None
    real_max_waiting: float | None = None
    in_server_at_most: float = 0.0  # max_running + max_waiting
    line: int = 0  # line of the runs file (the header is line 1)
    model_in_file: str = ""  # the row's spelling of the model, when it differs from ``model``
    flag: str = ""
    notes: tuple[str, ...] = ()  # fallbacks taken for empty or unusual columns


class RowError(ConfigError):
    """A row that cannot be replayed as it stands; ``reason`` says why (the row is skipped)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class SkippedRow:
    line: int  # line of the runs file (the header is line 1)
    run_id: str
    model: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunsTable:
    path: Path
    columns: tuple[str, ...]  # lower-case, stripped
    rows: list[dict[str, str]]
    lines: list[int]  # the file line each row starts on


# A runs file names each run and its engine settings, its served adapters' rates and ranks (any
# one column of each group), and at least one measured quantity to compare with.
REQUIRED_COLUMNS = ("run_id", "model", "max_loras", "max_cpu_loras", "max_lora_rank")
ONE_OF_COLUMNS = (
    ("rate_counts", "rates_set", "adapter_rates_rps"),
    ("rank_counts", "ranks_set", "adapter_ranks"),
    ("total_throughput", "itl_mean_ms", "ttft_mean_ms"),
)


def model_key(name: str) -> str:
    """What identifies a model in ``name``: no organisation prefix, case or separators
    (``meta-llama/Meta-Llama-3.1-8B-Instruct``, ``llama_3.1_8b_instruct``: ``llama318binstruct``).
    """
    base = name.strip().lower().rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9]", "", base).removeprefix("meta")


def canonical_model(name: str) -> str:
    """The data set's spelling of ``name`` if it is a model we know, else ``name`` itself."""
    known = {model_key(m): m for m in (*MODEL_MAX_LEN, *DEFAULT_PROFILES)}
    return known.get(model_key(name), name.strip())


def cell_text(row: dict[str, str], key: str) -> str:
    """The column's text, stripped; empty when empty or absent."""
    return (row.get(key) or "").strip()


def cell_float(row: dict[str, str], key: str) -> float:
    """The column as a number; nan when empty or unreadable."""
    text = cell_text(row, key)
    try:
        return float(text) if text else math.nan
    except ValueError:
        return math.nan


def _setting(row: dict[str, str], key: str) -> int:
    """A required engine setting: a whole number >= 1 (else the row is skipped)."""
    text = cell_text(row, key)
    if not text:
        raise RowError(f"{key} is empty")
    try:
        value = float(text)
    except ValueError:
        raise RowError(f"{key} is not a number ({text!r})") from None
    if not (math.isfinite(value) and value.is_integer() and value >= 1):
        raise RowError(f"{key} must be a whole number >= 1 (got {text!r})")
    return int(value)


def _optional_int(row: dict[str, str], key: str, notes: list[str]) -> int | None:
    """An optional whole number >= 1; None (with a note if it was unreadable) otherwise."""
    text = cell_text(row, key)
    value = cell_float(row, key)
    if not text:
        return None
    if not (math.isfinite(value) and value >= 1):
        notes.append(f"{key} unreadable ({text!r}): ignored")
        return None
    return int(value)


def _counts(text: str, key: str = "counts") -> list[tuple[float, int]]:
    """Parse ``"0.025:2 0.05:3"`` (also ``;`` / ``,`` separated) into (value, count)."""
    out: list[tuple[float, int]] = []
    for part in text.replace(";", " ").replace(",", " ").split():
        value, _, count = part.partition(":")
        try:
            v, c = float(value), float(count or 1)
        except ValueError:
            raise RowError(f"{key}: cannot read {part!r} (expected value:count pairs)") from None
        if not (math.isfinite(v) and c.is_integer() and c >= 0):
            raise RowError(f"{key}: cannot read {part!r} (expected value:count pairs)")
        out.append((v, int(c)))
    return out


def _values(row: dict[str, str], key: str) -> list[float]:
    """A list column (``"0.1 0.05 0.025"``, ``"8_16"``)."""
    return [v for v, _ in _counts(cell_text(row, key).replace("_", " "), key)]


def _whole(values: Sequence[float], key: str) -> list[int]:
    if any(not float(v).is_integer() for v in values):
        raise RowError(f"{key}: ranks must be whole numbers")
    return [int(v) for v in values]


def _served_ranks(row: dict[str, str], served: int) -> tuple[int, ...]:
    """Ranks of the served adapters: round robin over ``ranks_set`` as the benchmark's server
    creates them, checked against ``rank_counts`` (which wins if they disagree)."""
    pairs = _counts(cell_text(row, "rank_counts"), "rank_counts")
    rank_counts = list(
        zip(_whole([v for v, _ in pairs], "rank_counts"), [c for _, c in pairs], strict=True)
    )
    ranks_set = _whole(_values(row, "ranks_set"), "ranks_set")
    ranks_set = ranks_set or sorted({r for r, _ in rank_counts})
    if not ranks_set:
        raise RowError("rank_counts and ranks_set are both empty")
    ranks = tuple(ranks_set[i % len(ranks_set)] for i in range(served))
    if rank_counts:
        listed = sum(c for _, c in rank_counts)
        if listed != served:
            raise RowError(
                f"rank_counts lists {listed} adapters but max_cpu_loras (the served "
                f"adapters) is {served}"
            )
        wanted = Counter[int]()
        for r, c in rank_counts:
            wanted[r] += c
        if Counter(ranks) != wanted:
            ranks = tuple(r for r, c in sorted(wanted.items()) for _ in range(c))
    return ranks


def _served_rates(row: dict[str, str], served: int, notes: list[str]) -> tuple[float, ...]:
    """Nominal per-adapter rates (req/s): ``rate_counts``, else ``rates_set`` round robin."""
    rate_counts = _counts(cell_text(row, "rate_counts"), "rate_counts")
    if rate_counts:
        listed = sum(c for _, c in rate_counts)
        if listed != served:
            raise RowError(
                f"rate_counts lists {listed} adapters but max_cpu_loras (the served "
                f"adapters) is {served}"
            )
        rates = tuple(v for v, c in rate_counts for _ in range(c))
    else:
        rates_set = _values(row, "rates_set")
        if not rates_set:
            raise RowError("rate_counts and rates_set are both empty")
        rates = tuple(rates_set[i % len(rates_set)] for i in range(served))
        notes.append("rate_counts empty: rates_set assigned round robin, as the benchmark does")
    if any(r < 0 for r in rates):
        raise RowError(f"negative adapter rate in {sorted(set(rates))}")
    return rates


def _check_lora_settings(
    max_loras: int, max_cpu_loras: int, max_lora_rank: int, ranks: Sequence[int]
) -> None:
    """Settings a real vLLM 0.8.5 server refuses (so the row cannot be what it says)."""
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise RowError(
            f"max_lora_rank {max_lora_rank} is not one vLLM accepts "
            f"({', '.join(map(str, VLLM_MAX_LORA_RANKS))}): no server could start"
        )
    if max_cpu_loras < max_loras:
        raise RowError(
            f"max_cpu_loras {max_cpu_loras} < max_loras {max_loras}: vLLM refuses to start"
        )
    too_big = sorted({r for r in ranks if r > max_lora_rank or r < 1})
    if too_big:
        raise RowError(
            f"adapter rank {too_big[0]} outside 1..max_lora_rank {max_lora_rank}: "
            "vLLM refuses to load the adapter"
        )


def _mean_tokens(row: dict[str, str], key: str, notes: list[str]) -> float:
    value = cell_float(row, key)
    if math.isfinite(value) and value > 0:
        return value
    what = "empty" if not cell_text(row, key) else f"unreadable ({cell_text(row, key)!r})"
    notes.append(f"{key} {what}: ShareGPT's own length distribution (the pool samples it)")
    return math.nan


def _accounted(row: dict[str, str]) -> tuple[int | None, float | None, float]:
    """successful_requests + max_running + max_waiting, max_waiting, and the last two's sum
    (None / 0 where a column is empty)."""
    succ, running, waiting = (
        cell_float(row, k) for k in ("successful_requests", "max_running", "max_waiting")
    )
    if not all(math.isfinite(v) and v >= 0 for v in (succ, running, waiting)):
        return None, (waiting if math.isfinite(waiting) and waiting >= 0 else None), 0.0
    return int(succ + running + waiting), waiting, running + waiting


def _requests_path(row: dict[str, str], base: Path | None) -> str:
    """The run's ``requests_file`` next to the runs file or one level up (its data folder)."""
    name = cell_text(row, "requests_file")
    if not name or base is None:
        return ""
    for candidate in (base / name, base.parent / name, base / Path(name).name):
        if candidate.is_file():
            return str(candidate)
    raise RowError(f"requests file {name!r} of run {row.get('run_id')!r} not found near {base}")


def run_spec_from_row(row: dict[str, str], base: Path | None = None, *, line: int = 0) -> RunSpec:
    """One run's configuration; ``base``: the runs file's folder (to find ``requests_file``).

    Raises :class:`RowError` (the row is skipped) if it cannot be replayed as it stands.
    """
    run_id, model_in_file = cell_text(row, "run_id"), cell_text(row, "model")
    if not run_id:
        raise RowError("run_id is empty")
    if not model_in_file:
        raise RowError("model is empty")
    flag = cell_text(row, "flag")
    if flag in EXCLUDED_FLAGS:
        found, configured = cell_text(row, "served_adapters"), cell_text(row, "max_cpu_loras")
        detail = f" (found {found}, configured {configured})" if found and configured else ""
        raise RowError(f"flag {flag}: {EXCLUDED_FLAGS[flag]}{detail}")
    notes: list[str] = [f"flag {flag}: replayed with the row's settings"] if flag else []
    max_loras, max_cpu_loras = _setting(row, "max_loras"), _setting(row, "max_cpu_loras")
    max_lora_rank = _setting(row, "max_lora_rank")
    explicit = cell_text(row, "adapter_ranks")
    if explicit:
        ranks = tuple(_whole(_values(row, "adapter_ranks"), "adapter_ranks"))
        rates = tuple(_values(row, "adapter_rates_rps"))
        if len(rates) != len(ranks):
            raise RowError(f"{len(rates)} adapter rates for {len(ranks)} adapter ranks")
        window = cell_float(row, "window_s")
        if not (math.isfinite(window) and window > 0):
            window = cell_float(row, "duration_s")
        requests_path = _requests_path(row, base)
    else:
        ranks = _served_ranks(row, max_cpu_loras)
        rates = _served_rates(row, max_cpu_loras, notes)
        window = cell_float(row, "total_time_s")
        requests_path = ""
    _check_lora_settings(max_loras, max_cpu_loras, max_lora_rank, ranks)
    accounted, real_max_waiting, in_server = _accounted(row)
    model = canonical_model(model_in_file)
    return RunSpec(
        run_id=run_id,
        model=model,
        workload=cell_text(row, "workload"),
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_lora_rank=max_lora_rank,
        ranks=ranks,
        rates_rps=rates,
        requests_sent=_optional_int(row, "requests_sent", notes),
        mean_prompt_tokens=_mean_tokens(row, "pool_mean_input_tokens", notes),
        mean_output_tokens=_mean_tokens(row, "pool_mean_output_tokens", notes),
        real_window_s=window if math.isfinite(window) and window > 0 else 3600.0,
        max_num_seqs=_optional_int(row, "max_num_seqs", notes),
        token_budget=_optional_int(row, "max_num_batched_tokens", notes),
        max_model_len=_optional_int(row, "max_model_len", notes),
        requests_path=requests_path,
        adapters_in_gpu_at_start=not explicit,
        accounted_requests=accounted,
        real_max_waiting=real_max_waiting,
        in_server_at_most=in_server,
        line=line,
        model_in_file=model_in_file if model_in_file != model else "",
        flag=flag,
        notes=tuple(notes),
    )


def read_table(path: str | Path, *, key: str = "real_runs") -> RunsTable:
    """A CSV file's rows, keyed by lower-case column names; one clear error if unreadable."""
    p = Path(path)
    if not p.is_file():
        what = "not a file" if p.exists() else "not found"
        raise ConfigError(f"runs file {what}: {p}", key=key)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p} is not a UTF-8 CSV file (undecodable byte at offset {exc.start})", key=key
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}", key=key) from exc
    header = text.split("\n", 1)[0]
    if not header.strip():
        raise ConfigError(f"{p} is empty (no header line)", key=key)
    # A tab- or semicolon-separated export of the same table reads as well.
    delimiter = next((d for d in (",", "\t", ";") if d in header), ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    start = 1  # the line the record being read starts on
    try:
        columns = tuple(c.strip().lower() for c in next(reader))
        start = reader.line_num + 1
        for record in reader:
            if any(field.strip() for field in record):  # blank lines are not rows
                rows.append(dict(zip(columns, record, strict=False)))
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ConfigError(f"{p}: unreadable CSV at line {start}: {exc}", key=key) from exc
    return RunsTable(path=p, columns=columns, rows=rows, lines=lines)


def read_rows(path: str | Path) -> list[dict[str, str]]:
    return read_table(path).rows


def check_columns(table: RunsTable) -> None:
    """One clear error if ``table`` lacks a column every run needs."""
    have = set(table.columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in have]
    missing += [" or ".join(group) for group in ONE_OF_COLUMNS if not have & set(group)]
    if missing:
        shown = ", ".join(c for c in table.columns[:6] if c) + (
            ", ..." if len(table.columns) > 6 else ""
        )
        raise ConfigError(
            f"{table.path} does not have the columns of a runs file (validation/real_runs.csv): "
            f"missing {'; '.join(missing)} (its header: {shown or 'empty'})",
            key="real_runs",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """The rows of a runs file: the runs to replay (with their rows), the rows skipped with
    the reason, and how many the caller's filters (--model, --run-id, --limit) left out."""

    runs: list[tuple[RunSpec, dict[str, str]]]
    skipped: list[SkippedRow]
    not_selected: int


def select_runs(
    table: RunsTable,
    *,
    models: Sequence[str] = (),
    limit: int | None = None,
    run_ids: Sequence[str] = (),
) -> Selection:
    wanted = {canonical_model(m) for m in models}
    base = table.path.resolve().parent
    runs: list[tuple[RunSpec, dict[str, str]]] = []
    skipped: list[SkippedRow] = []
    not_selected = 0
    for row, line in zip(table.rows, table.lines, strict=True):
        run_id, model = cell_text(row, "run_id"), canonical_model(cell_text(row, "model"))
        if (wanted and model not in wanted) or (run_ids and run_id not in run_ids):
            not_selected += 1
            continue
        try:
            runs.append((run_spec_from_row(row, base, line=line), row))
        except RowError as exc:
            skipped.append(SkippedRow(line=line, run_id=run_id, model=model, reason=exc.reason))
        except (ValueError, TypeError, OverflowError) as exc:  # a value no check above names
            skipped.append(
                SkippedRow(
                    line=line,
                    run_id=run_id,
                    model=model,
                    reason=f"unreadable row ({type(exc).__name__}: {exc})",
                )
            )
    if limit is not None and len(runs) > limit:
        not_selected += len(runs) - max(limit, 0)
        runs = runs[: max(limit, 0)]
    return Selection(runs=runs, skipped=skipped, not_selected=not_selected)


def select_specs(
    rows: Sequence[dict[str, str]],
    *,
    models: Sequence[str] = (),
    limit: int | None = None,
    run_ids: Sequence[str] = (),
    base: Path | None = None,
) -> list[RunSpec]:
    """The replayable runs of ``rows`` (rows that cannot be replayed are left out)."""
    table = RunsTable(
        path=(base or Path.cwd()) / "runs.csv",
        columns=(),
        rows=list(rows),
        lines=list(range(2, len(rows) + 2)),
    )
    return [s for s, _ in select_runs(table, models=models, limit=limit, run_ids=run_ids).runs]
