"""Per-request records of a simulation and their streaming writers (CSV or JSON lines)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any, Literal

Status = Literal["ok", "rejected", "unfinished"]

# Why a request was rejected (``SimRecord.reason``):
CONTEXT_LENGTH = "context_length"  # prompt (+ max_tokens) over max_model_len: vLLM's 400
INVALID_REQUEST = "invalid_request"  # any other 400 from the replica
NO_REPLICA = "no_replica"  # routing found no replica to take it
# Rejections that are the request's own fault: the replica answers at once, so they are not
# load the deployment failed to serve (they are left out of the offered tokens).
INVALID_REASONS = frozenset({CONTEXT_LENGTH, INVALID_REQUEST})


@dataclass(frozen=True, slots=True, kw_only=True)
class SimRecord:
    """One request's fate. Times are simulated seconds; NaN where they do not apply.

    ``itl_s`` is the mean inter-token latency ``(finish - first token) / (output_tokens - 1)``
    (NaN for one-token outputs). ``status``: ``ok`` finished, ``rejected`` refused (``reason``:
    ``context_length``, ``invalid_request`` or ``no_replica``), ``unfinished`` still running when
    the drain limit was reached.
    """

    request_id: str
    adapter: str | None
    rank: int
    replica: str | None
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    deferred_s: float
    preemptions: int
    status: Status
    reason: str = ""  # rejected requests only

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def itl_s(self) -> float:
        if self.output_tokens < 2:
            return math.nan
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)

    def values(self) -> tuple[object, ...]:
        """Field values in :data:`COLUMNS` order."""
        return (
            self.request_id,
            self.adapter,
            self.rank,
            self.replica,
            self.arrival_s,
            self.first_token_s,
            self.finish_s,
            self.prompt_tokens,
            self.max_tokens,
            self.output_tokens,
            self.deferred_s,
            self.preemptions,
            self.status,
            self.ttft_s,
            self.itl_s,
            self.e2e_s,
            self.reason,
        )

    def row(self) -> dict[str, object]:
        return dict(zip(COLUMNS, self.values(), strict=True))


COLUMNS = [f.name for f in fields(SimRecord) if f.name != "reason"] + [
    "ttft_s",
    "itl_s",
    "e2e_s",
    "reason",
]
RecordFormat = Literal["csv", "jsonl"]


class RecordWriter:
    """Writes records as they are produced (memory stays flat for long runs)."""

    __slots__ = ("_csv", "_fh", "_format", "count", "path")

    def __init__(self, path: Path, fmt: RecordFormat = "csv") -> None:
        self.path = path
        self._format = fmt
        self._fh: IO[str] = path.open("w", encoding="utf-8", newline="")
        self._csv: Any = None
        if fmt == "csv":
            self._csv = csv.writer(self._fh)
            self._csv.writerow(COLUMNS)
        self.count = 0

    def write(self, rec: SimRecord) -> None:
        if self._csv is not None:
            self._csv.writerow([_csv_value(v) for v in rec.values()])
        else:
            row = rec.row()
            clean = {
                k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()
            }
            self._fh.write(json.dumps(clean, separators=(",", ":")) + "\n")
        self.count += 1

    def close(self) -> None:
        self._fh.close()


def _csv_value(v: object) -> object:
    if v is None:
        return ""
    if type(v) is float:
        return "" if v != v else f"{v:.6f}"
    return v
