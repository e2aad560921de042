"""``twin validate`` on runs files unlike R1's: held-out runs as an evaluator may package them.

``data/r1_rows.csv`` holds two rows copied from ``validation/real_runs.csv`` (a light Llama run
and a loaded Qwen run); each test changes copies of them the way a held-out file may differ:
empty or missing optional columns, other rate and rank sets, settings outside the KV table,
flags, other model names, wrong columns. Every row must come back replayed or skipped with a
reason, and bad files must be one clear line (exit 2), never a traceback.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from loragate.cli import main as cli_main
from loragate.twin.real_runs import RunSpec, run_spec_from_row
from loragate.twin.validate import validate
from loragate.twin.validate_workload import (
    OfferedCount,
    ValidateConfig,
    offered_requests,
    synthesize_arrivals,
)

ROWS = Path(__file__).resolve().parent / "data" / "r1_rows.csv"
LLAMA = "llama-3.1-8b-instruct/rank_16_rates_0.1_0.05_0.025/_8_8_16_"
QWEN = "qwen-2.5-7b-instruct/rank_32_rates_1.6_0.8_0.4/_16_16_32_"
WINDOW = ["--window-s", "20", "--jobs", "1"]
CFG = ValidateConfig(window_s=20.0)


def _r1() -> tuple[list[str], dict[str, dict[str, str]]]:
    with ROWS.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = {r["run_id"]: r for r in reader}
        return list(reader.fieldnames or ()), rows


def _row(source: str = LLAMA, **changes: str) -> dict[str, str]:
    row = dict(_r1()[1][source])
    row.update(changes)
    return row


def _write(path: Path, rows: list[dict[str, str]], fields: list[str] | None = None) -> Path:
    fields = fields or _r1()[0]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli_main(["twin", "validate", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _runs(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["run_id"]: r for r in result["runs"]}


def test_empty_optional_columns_fall_back_and_say_so(tmp_path: Path) -> None:
    empty = (
        "requests_sent",
        "pool_mean_input_tokens",
        "pool_mean_output_tokens",
        "ranks_set",
        "rate_counts",
        "total_time_s",
        "ttft_mean_penalised_ms",
        "max_running",
        "flag",
    )
    path = _write(tmp_path / "runs.csv", [_row(**dict.fromkeys(empty, ""))])
    result = validate(path, cfg=CFG, jobs=1)
    assert result["runs_failed"] == [] and result["runs_skipped"] == []
    (run,) = result["runs"]  # type: ignore[misc]
    assert run["ours"]["requests_sent"] > 0 and run["ours"]["total_throughput"] > 0
    notes = " | ".join(run["notes"])
    assert "rates_set assigned round robin" in notes
    assert "pool_mean_input_tokens empty" in notes and "pool_mean_output_tokens empty" in notes
    # no requests_sent and no max_running: the nominal rates, and the output says why
    assert run["ours"]["offered_load"].startswith("nominal (")
    assert result["offered_load"] == {run["ours"]["offered_load"]: 1}
    # the penalised TTFT has no real value to compare with: n = 0, not an error
    (model,) = result["models"]  # type: ignore[misc]
    assert model["ours"]["ttft_penalised"]["n"] == 0 and model["ours"]["throughput"]["n"] == 1


def test_missing_optional_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file with only the settings and one measured quantity (no rank_counts, no lengths,
    no requests_sent, no paper twin beside it) is replayed."""
    fields = [
        "run_id",
        "model",
        "rates_set",
        "ranks_set",
        "max_loras",
        "max_cpu_loras",
        "max_lora_rank",
        "total_throughput",
    ]
    path = _write(tmp_path / "runs.csv", [_row(), _row(QWEN)], fields)
    code, out, _ = _cli(capsys, "--real-runs", str(path), *WINDOW, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["runs_replayed"] == 2 and not result["runs_failed"]
    qwen = _runs(result)[QWEN]
    assert qwen["notes"] and qwen["ours"]["total_throughput"] > 0
    for m in result["models"]:
        assert m["ours"]["throughput"]["n"] == 1 and m["ours"]["itl"]["n"] == 0


def test_offered_load_sources() -> None:
    """sent -> requests_sent; without it, completed + still running + still waiting where that
    is more certain than the nominal rates' Poisson spread and the engine queue stayed below
    the front-end cap, else the nominal rates; nominal ignores both."""
    light = run_spec_from_row(_row(requests_sent=""))
    assert light.accounted_requests == 1734 + 8 + 0
    # 8 requests left in the server at most, against sqrt(1800) = 42 for the Poisson count
    assert offered_requests(light, CFG, 20_000) == OfferedCount(1742.0, "accounted")
    sent = run_spec_from_row(_row())
    assert offered_requests(sent, CFG, 20_000) == OfferedCount(1736.0, "requests_sent")
    nominal = ValidateConfig(window_s=20.0, offered_load="nominal")
    assert offered_requests(sent, nominal, 20_000) == OfferedCount(
        pytest.approx(1800.0), "nominal", nominal=True
    )
    queued = run_spec_from_row(_row(requests_sent="", max_waiting="500"))
    queued_count = offered_requests(queued, CFG, 20_000)
    assert queued_count.requests == pytest.approx(1800.0) and queued_count.nominal
    assert "Poisson spread" in queued_count.source
    full = run_spec_from_row(_row(requests_sent="", max_waiting="26000"))
    full_count = offered_requests(full, CFG, 20_000)
    assert full_count.requests == pytest.approx(1800.0) and full_count.nominal
    assert "front-end cap" in full_count.source
    # a profile without a front-end cap: only the Poisson test decides
    assert offered_requests(full, CFG, None).source.startswith("nominal (the requests left")
    assert offered_requests(light, CFG, None).source == "accounted"


def test_a_realised_count_above_nominal_is_replayed_too() -> None:
    """requests_sent is the realised Poisson count, above the nominal mean as often as below."""
    spec = run_spec_from_row(_row(rate_counts="2:8", requests_sent="60480"))  # 1.05 x nominal
    n = synthesize_arrivals(spec, ValidateConfig(window_s=3600.0)).time_s.size
    assert n == pytest.approx(60480, rel=0.02)
    below = run_spec_from_row(_row(rate_counts="2:8", requests_sent="54720"))  # 0.95 x
    assert synthesize_arrivals(below, ValidateConfig(window_s=3600.0)).time_s.size == pytest.approx(
        54720, rel=0.02
    )


def test_other_rates_ranks_and_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        # rates and a rank R1 never used; rank 64 is beyond the KV table: the line extrapolates
        _row(
            run_id="r64",
            rates_set="3.2 0.2",
            rate_counts="3.2:2 0.2:2",
            ranks_set="64",
            rank_counts="64:4",
            max_loras="4",
            max_cpu_loras="4",
            max_lora_rank="64",
        ),
        # far beyond the KV table: the twin's server does not start (vLLM's start-up check)
        _row(
            run_id="big",
            rates_set="0.01",
            rate_counts="0.01:512",
            ranks_set="64",
            rank_counts="64:512",
            max_loras="512",
            max_cpu_loras="512",
            max_lora_rank="64",
        ),
        # in the KV table as a server that did not start (R7: 128 slots at rank 32)
        _row(
            run_id="r7fail",
            rate_counts="0.01:128",
            rank_counts="8:64 16:64",
            ranks_set="8 16",
            max_loras="128",
            max_cpu_loras="128",
            max_lora_rank="32",
        ),
        # settings no vLLM server accepts: skipped, with the reason
        _row(run_id="rank>max", rank_counts="8:4 32:4", ranks_set="8 32"),
        _row(run_id="odd-rank", max_lora_rank="48"),
        _row(run_id="cpu<gpu", max_loras="16"),
        _row(run_id="counts", rate_counts="0.1:3 0.05:3"),
        _row(run_id="nan", max_loras="eight"),
    ]
    path = _write(tmp_path / "runs.csv", rows)
    code, out, _ = _cli(capsys, "--real-runs", str(path), *WINDOW, "--json")
    assert code == 0
    result = json.loads(out)
    runs = _runs(result)
    assert runs["r64"]["ours"]["error"] == "" and runs["r64"]["ours"]["itl_mean_ms"] > 0
    failed = {f["run_id"]: f["error"] for f in result["runs_failed"]}
    assert set(failed) == {"big", "r7fail"}
    assert all("would not start" in e and "KV cache" in e for e in failed.values())
    skipped = {s["run_id"]: s["reason"] for s in result["runs_skipped"]}
    assert "adapter rank 32 outside 1..max_lora_rank 16" in skipped["rank>max"]
    assert "max_lora_rank 48 is not one vLLM accepts" in skipped["odd-rank"]
    assert "max_cpu_loras 8 < max_loras 16" in skipped["cpu<gpu"]
    assert "rate_counts lists 6 adapters but max_cpu_loras" in skipped["counts"]
    assert skipped["nan"] == "max_loras is not a number ('eight')"
    assert result["rows_read"] == len(runs) + len(skipped) == len(rows)
    # the text output lists the same rows with the same reasons
    code, text, _ = _cli(capsys, "--real-runs", str(path), *WINDOW)
    assert code == 0
    assert "skipped: 5" in text and "failed: 2" in text
    for run_id, reason in skipped.items():
        assert f"{run_id}: {reason}" in text
    assert f"big: {failed['big']}" in text


def test_flagged_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path / "runs.csv",
        [
            _row(run_id="mismatch", flag="served_adapters_mismatch", served_adapters="7"),
            _row(run_id="folder", flag="folder_name_mismatch"),
            _row(run_id="clean"),
        ],
    )
    result = validate(path, cfg=CFG, jobs=1)
    (skip,) = result["runs_skipped"]  # type: ignore[misc]
    assert skip["run_id"] == "mismatch" and skip["line"] == 2
    assert skip["reason"].startswith("flag served_adapters_mismatch: ")
    runs = _runs(result)
    assert set(runs) == {"folder", "clean"}
    assert runs["folder"]["flag"] == "folder_name_mismatch"
    assert any("folder_name_mismatch" in n for n in runs["folder"]["notes"])
    code, text, _ = _cli(capsys, "--real-runs", str(path), *WINDOW)
    assert code == 0 and "line 2  mismatch: flag served_adapters_mismatch" in text


def test_unknown_model_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "runs.csv", [_row(model="mistral-7b-instruct"), _row(QWEN)])
    code, out, err = _cli(capsys, "--real-runs", str(path), *WINDOW)
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert "no profile for model 'mistral-7b-instruct'" in err
    assert "--profile 'mistral-7b-instruct=PROFILE'" in err
    code, _, err = _cli(capsys, "--real-runs", str(path), *WINDOW, "--json")
    assert code == 2 and "mistral-7b-instruct" in json.loads(err)["error"]["message"]
    # with a profile it is replayed; max_model_len comes from the profile's own model
    code, out, _ = _cli(
        capsys,
        "--real-runs",
        str(path),
        *WINDOW,
        "--json",
        "--profile",
        "mistral-7b-instruct=llama-3.1-8b-h100",
    )
    assert code == 0
    result = json.loads(out)
    run = _runs(result)[LLAMA]
    assert run["profile"] == "llama-3.1-8b-h100" and not run["ours"]["error"]
    assert any("131072, the default of llama-3.1-8b-instruct" in n for n in run["notes"])
    # an unknown profile name: one line too, before anything is replayed
    code, _, err = _cli(
        capsys, "--real-runs", str(path), *WINDOW, "--profile", "mistral-7b-instruct=nope"
    )
    assert code == 2 and err.count("\n") == 1 and "unknown profile 'nope'" in err


def test_model_names_spelled_otherwise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path / "runs.csv",
        [
            _row(model="meta-llama/Meta-Llama-3.1-8B-Instruct"),
            _row(QWEN, model="Qwen/Qwen2.5-7B-Instruct"),
        ],
    )
    code, out, _ = _cli(
        capsys, "--real-runs", str(path), *WINDOW, "--json", "--model", "Llama-3.1-8B-Instruct"
    )
    assert code == 0
    result = json.loads(out)
    (run,) = result["runs"]
    assert run["model"] == "llama-3.1-8b-instruct" and run["profile"] == "llama-3.1-8b-h100"
    assert run["model_in_file"] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert result["rows_not_selected"] == 1
    code, out, _ = _cli(
        capsys,
        "--real-runs",
        str(path),
        *WINDOW,
        "--json",
        "--profile",
        "qwen2.5-7b-instruct=qwen-2.5-7b-h100-batch",
    )
    assert code == 0
    profiles = {m["model"]: m["profile"] for m in json.loads(out)["models"]}
    assert profiles == {
        "llama-3.1-8b-instruct": "llama-3.1-8b-h100",
        "qwen-2.5-7b-instruct": "qwen-2.5-7b-h100-batch",
    }


def test_a_bare_profile_is_for_every_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "runs.csv", [_row(model="my-model"), _row(QWEN)])
    code, out, _ = _cli(
        capsys,
        "--real-runs",
        str(path),
        *WINDOW,
        "--json",
        "--profile",
        "qwen-2.5-7b-h100-batch",
        "--profile",
        "qwen-2.5-7b-instruct=qwen-2.5-7b-h100",
    )
    assert code == 0
    profiles = {m["model"]: m["profile"] for m in json.loads(out)["models"]}
    assert profiles == {
        "my-model": "qwen-2.5-7b-h100-batch",
        "qwen-2.5-7b-instruct": "qwen-2.5-7b-h100",
    }
    code, _, err = _cli(capsys, "--real-runs", str(path), "--profile", "=x")
    assert code == 2 and "MODEL=PROFILE" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a,b,c\n1,2,3\n", "missing run_id; model; max_loras"),
        (
            "run_id,model,max_loras,max_cpu_loras,max_lora_rank,rank_counts,total_throughput\n",
            "missing rate_counts or rates_set or adapter_rates_rps",
        ),
        ("", "is empty (no header line)"),
        (b"\xff\xfe\x00r\x00u\x00n", "not a UTF-8 CSV file"),
        ("run_id,model\n" + "x" * 200_000 + ",y\n", "unreadable CSV at line 2"),
    ],
)
def test_a_file_that_is_not_a_runs_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes, message: str
) -> None:
    path = tmp_path / "runs.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, out, err = _cli(capsys, "--real-runs", str(path), *WINDOW)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_no_replayable_row_is_one_line_with_the_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path / "runs.csv", [_row(flag="served_adapters_mismatch"), _row(max_lora_rank="")]
    )
    code, _, err = _cli(capsys, "--real-runs", str(path), *WINDOW)
    assert code == 2 and err.count("\n") == 1
    assert "max_lora_rank is empty" in err and "served_adapters_mismatch" in err


def test_duplicate_run_ids_compare_with_their_own_row(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "runs.csv", [_row(total_throughput="100"), _row(total_throughput="300")]
    )
    result = validate(path, cfg=CFG, jobs=1)
    assert [r["real"]["total_throughput"] for r in result["runs"]] == [100.0, 300.0]
    assert [r["line"] for r in result["runs"]] == [2, 3]


def test_semicolon_separated_and_upper_case_header(tmp_path: Path) -> None:
    fields, _ = _r1()
    path = tmp_path / "runs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=";")
        writer.writerow([f.upper() for f in fields])
        writer.writerow([_row()[f] for f in fields])
    result = validate(path, cfg=CFG, jobs=1)
    assert result["runs_replayed"] == 1 and not result["runs_failed"]


def test_every_row_is_accounted_for_with_filters(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "runs.csv",
        [
            _row(run_id="a"),
            _row(run_id="b"),
            _row(run_id="c", max_loras=""),
            _row(QWEN),
        ],
    )
    result = validate(path, cfg=CFG, jobs=1, models=["llama-3.1-8b-instruct"], limit=1)
    assert [r["run_id"] for r in result["runs"]] == ["a"]  # type: ignore[attr-defined]
    assert [s["run_id"] for s in result["runs_skipped"]] == ["c"]  # type: ignore[attr-defined]
    assert result["rows_not_selected"] == 2  # the Qwen row and "b" (beyond --limit)
    assert result["rows_read"] == 4


def test_spec_keeps_the_row_settings() -> None:
    spec = run_spec_from_row(_row(max_model_len="8192", max_num_seqs="256"), line=7)
    assert isinstance(spec, RunSpec)
    assert (spec.max_model_len, spec.max_num_seqs, spec.line) == (8192, 256, 7)


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "runs.csv", [_row()])
    bad = _write(tmp_path / "bad.csv", [_row(max_loras="")]).read_text().splitlines()[1]
    path.write_text(path.read_text() + "\n\n" + bad + "\n")
    result = validate(path, cfg=CFG, jobs=1)
    assert [r["line"] for r in result["runs"]] == [2]  # type: ignore[attr-defined]
    assert [s["line"] for s in result["runs_skipped"]] == [5]  # type: ignore[attr-defined]


@pytest.mark.parametrize("window", ["0", "-5", "nan"])
def test_a_window_that_is_not_positive_is_one_line(
    capsys: pytest.CaptureFixture[str], window: str
) -> None:
    code, _, err = _cli(capsys, "--real-runs", str(ROWS), "--window-s", window)
    assert code == 2 and err.count("\n") == 1 and "window_s: must be a positive" in err
