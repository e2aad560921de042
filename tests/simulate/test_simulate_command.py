"""``loragate simulate`` end to end through the CLI entry point."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tiny_spec import SPEC

from loragate.cli import main


def test_json_summary_and_records(
    spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [
        "simulate",
        "--workload",
        str(spec_file),
        "--replicas",
        "2",
        "--policy",
        "loragate",
        "--max-loras",
        "2",
        "--json",
        "--out",
        str(out),
        "--ttft-slo-ms",
        "30",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["policy"] == "loragate"
    assert summary["config"]["engine"]["max_lora_rank"] == 32  # from the workload
    assert summary["slo"]["ttft_ms"] == 30
    with (out / "records.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["requests"]["total"] > 100
    assert {r["replica"] for r in rows} == {"r0", "r1"}
    assert json.loads((out / "summary.json").read_text())["requests"] == summary["requests"]
    # Same seed -> same records file.
    assert main([*argv[:-4], "--out", str(tmp_path / "again"), "--ttft-slo-ms", "30"]) == 0
    capsys.readouterr()
    assert (tmp_path / "again" / "records.csv").read_text() == (out / "records.csv").read_text()


def test_text_output_and_jsonl(
    spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "simulate",
        "--workload",
        str(spec_file),
        "--replicas",
        "1",
        "--records",
        "jsonl",
        "--out",
        str(tmp_path),
        "--seed",
        "9",
        "--duration-s",
        "5",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "starved" in text and "TTFT" in text
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["status"] == "ok" and first["arrival_s"] < 5


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--policy", "fastest"], "unknown policy 'fastest'"),
        (["--replicas", "0"], "--replicas: must be >= 1"),
        (["--max-lora-rank", "8"], "--max-lora-rank: 8 is below"),
        (["--max-lora-rank", "48"], "--max-lora-rank: must be one of vLLM's [1, 8, 16, 32, 64"),
        (["--max-loras", "4", "--max-cpu-loras", "2"], "--max-cpu-loras: "),
        (["--profile", "no-such-profile"], "no-such-profile"),
        (["--seed", "-5"], "--seed: must be >= 0, got -5"),
        (["--duration-s", "0"], "--duration-s: must be > 0, got 0"),
    ],
)
def test_bad_input_is_one_clear_error(
    spec_file: Path, extra: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--workload", str(spec_file), "--replicas", "1", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loragate simulate: error:")
    assert fragment in err
    assert err.count("\n") == 1


def test_bad_workload_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.replace("rate_rps: 10", "rate_rps: -1"))
    assert main(["simulate", "--workload", str(bad), "--replicas", "1"]) == 2
    assert "arrivals.rate_rps: must be > 0" in capsys.readouterr().err
