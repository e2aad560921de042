"""Every request of a load test as one JSON line, written as it finishes (so a run cut short
still leaves the records of what finished)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from loragate.loadtest.openloop import RequestResult


def record_of(r: RequestResult) -> dict[str, Any]:
    """A JSON-ready record: the result's fields and ``ok``."""
    return {**asdict(r), "ok": r.ok}


class RecordWriter:
    """Appends one JSON line per :class:`RequestResult` to ``path`` (created or truncated)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0
        self._file: TextIO = path.open("w", encoding="utf-8")

    def write(self, r: RequestResult) -> None:
        self._file.write(json.dumps(record_of(r)) + "\n")
        self.written += 1

    def close(self) -> None:
        self._file.close()
