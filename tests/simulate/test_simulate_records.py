"""Record rows: every column holds the field of its name, in CSV and JSON lines."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest

from loragate.simulate.records import COLUMNS, RecordWriter, SimRecord

REC = SimRecord(
    request_id="q7",
    adapter="lora-3",
    rank=16,
    replica="r1",
    arrival_s=1.25,
    first_token_s=1.5,
    finish_s=2.5,
    prompt_tokens=100,
    max_tokens=5,
    output_tokens=5,
    deferred_s=0.125,
    preemptions=2,
    status="ok",
)


def test_row_names_match_fields() -> None:
    row = REC.row()
    assert list(row) == COLUMNS
    for name in COLUMNS[:13]:
        assert row[name] == getattr(REC, name)
    assert row["ttft_s"] == pytest.approx(0.25)
    assert row["itl_s"] == pytest.approx(0.25)
    assert row["e2e_s"] == pytest.approx(1.25)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_writers_round_trip(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"r.{fmt}"
    w = RecordWriter(path, "csv" if fmt == "csv" else "jsonl")
    w.write(REC)
    w.close()
    if fmt == "csv":
        with path.open() as fh:
            (row,) = list(csv.DictReader(fh))
        assert row["adapter"] == "lora-3" and row["replica"] == "r1" and row["rank"] == "16"
        assert float(row["deferred_s"]) == 0.125 and row["preemptions"] == "2"
        assert float(row["itl_s"]) == pytest.approx(0.25)
    else:
        row = json.loads(path.read_text())
        assert row["adapter"] == "lora-3" and row["rank"] == 16 and row["preemptions"] == 2
        assert row["itl_s"] == pytest.approx(0.25)


def test_itl_undefined_for_one_token() -> None:
    assert math.isnan(dataclasses.replace(REC, output_tokens=1).itl_s)
