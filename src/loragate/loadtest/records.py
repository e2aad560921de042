"""Every request of a load test as one JSON line, written as it finishes (so a run cut short
still leaves the records of what finished).

A record's keys (:class:`~loragate.loadtest.openloop.RequestResult`'s fields and ``ok``):

- ``index``: the request's place in the run (0, 1, ...); ``ok``: it succeeded (HTTP 200 and a
  complete answer);
- ``adapter`` (the workload's; null: the base model), ``model`` (the name sent), ``endpoint``,
  ``prompt_tokens``, ``max_tokens``;
- ``scheduled_s``, ``sent_s``: offsets in seconds from the run's start (the summary's
  ``run.started_at`` / ``run.started_epoch_s``); ``sent_at``: the send time as Unix epoch
  seconds (wall clock: joins with other logs);
- ``request_id``: the answer's ``X-Request-Id`` (a loragate gateway's log lines name the
  request by it; null when no answer came or it had none); ``sent_request_id``: the
  ``X-Request-Id`` sent, ``lt-<run id>-<index>`` (the summary's ``run.id``), which a loragate
  gateway keeps, so it is what the gateway logged for a request whose answer never came;
- ``status`` (0: no answer), ``replica`` (the gateway's ``X-Loragate-Replica``; null: none),
  ``streamed``, ``ttft_s``, ``latency_s``, ``output_tokens``, ``tokens_source``,
  ``finish_reason``;
- ``error``, ``error_type`` (null when ok; the types: :mod:`loragate.loadtest.openloop`).
"""

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
