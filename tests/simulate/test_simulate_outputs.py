"""What ``loragate simulate`` records and prints is enough to tell runs apart and trust them.

- ``summary.json`` names the routing section run (its parameters and the sha256 a gateway shows
  for it in ``loragate_config_info``), the policy and workload files, the KV cache as run,
  ``--drain-s``, loragate's version and a ``schema_version``.
- A run owns its ``--out`` directory's outputs: an earlier run's are refused (or, with
  ``--overwrite``, removed before anything is written), never mixed with the new ones; other
  files there are never touched.
- The text summary prints adapter loads readably and the replicas' LoRA settings; the KV
  cache error names the flags that size it, not vLLM's ``gpu_memory_utilization``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

import loragate
from loragate.cli import main
from loragate.gateway import load_config, running_gateway
from loragate.simulate.outputs import claim

REPO = Path(__file__).resolve().parents[2]
WORKLOAD = str(REPO / "workload" / "demo.yaml")
LORAGATE_POLICY = REPO / "examples" / "policies" / "loragate.yaml"
BASE_ARGS = ["simulate", "--workload", WORKLOAD, "--replicas", "2", "--duration-s", "2"]


def _run(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    assert main([*BASE_ARGS, "--json", *extra]) == 0
    summary: dict[str, Any] = json.loads(capsys.readouterr().out)
    return summary


def _variant(tmp_path: Path) -> Path:
    """examples/policies/loragate.yaml with another new_slot_weight."""
    text = LORAGATE_POLICY.read_text(encoding="utf-8")
    changed = re.sub(r"new_slot_weight: [0-9.]+", "new_slot_weight: 3.0", text)
    assert changed != text
    path = tmp_path / "heavy-slots.yaml"
    path.write_text(changed, encoding="utf-8")
    return path


# -- 1. the summary says what was run --------------------------------------------------------


def test_summary_tells_policy_variants_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = _run(capsys, "--policy", str(LORAGATE_POLICY))["config"]
    variant_file = _variant(tmp_path)
    variant = _run(capsys, "--policy", str(variant_file))["config"]
    assert default["policy"] == variant["policy"] == "loragate"  # the name alone cannot tell
    assert default["routing"]["section"]["new_slot_weight"] == 0.5
    assert variant["routing"]["section"]["new_slot_weight"] == 3.0
    assert variant["routing"]["section"]["policy"] == "loragate"
    assert re.fullmatch(r"[0-9a-f]{64}", variant["routing"]["sha256"])
    assert default["routing"]["sha256"] != variant["routing"]["sha256"]
    assert default["policy_file"] == str(LORAGATE_POLICY)
    assert variant["policy_file"] == str(variant_file)

    composed = tmp_path / "composed.yaml"
    composed.write_text(
        "routing:\n  scorers: [{name: queue, weight: 2}, {name: lora_affinity, weight: 1}]\n"
        "  picker: max_score\n",
        encoding="utf-8",
    )
    custom = _run(capsys, "--policy", str(composed))["config"]
    assert custom["policy"] == "custom"
    assert custom["routing"]["section"]["scorers"][0] == {"name": "queue", "weight": 2}

    by_name = _run(capsys, "--policy", "loragate")["config"]
    assert by_name["policy_file"] is None
    assert by_name["routing"]["section"] == "loragate"


def test_summary_resolves_every_routing_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The name and the example file (every default written out) are one policy: their
    sections differ, their resolved parameters and sha256 do not; the variant differs in its
    one parameter, and in its sha256."""
    named = _run(capsys, "--policy", "loragate")["config"]["routing"]
    by_name = named["parameters"]
    from_file = _run(capsys, "--policy", str(LORAGATE_POLICY))["config"]["routing"]
    variant = _run(capsys, "--policy", str(_variant(tmp_path)))["config"]["routing"]
    assert by_name["policy"] == "loragate" and by_name["params"]["new_slot_weight"] == 0.5
    assert from_file["parameters"] == by_name
    assert from_file["section"] != named["section"]
    assert from_file["sha256"] == named["sha256"] != variant["sha256"]
    differs = {k for k, v in variant["parameters"]["params"].items() if by_name["params"][k] != v}
    assert differs == {"new_slot_weight"}
    assert set(variant["parameters"]["params"]) == set(by_name["params"])

    composed = tmp_path / "composed.yaml"
    composed.write_text(
        "routing:\n  filters: [registered]\n"
        "  scorers: [{name: expected_ttft, weight: 2, params: {new_slot_weight: 3}}, queue]\n",
        encoding="utf-8",
    )
    resolved = _run(capsys, "--policy", str(composed))["config"]["routing"]["parameters"]
    assert resolved["name"] == "custom"
    assert resolved["filters"] == [{"name": "registered", "params": {"fallback": True}}]
    ttft, queue = resolved["scorers"]
    assert ttft["weight"] == 2 and queue == {"name": "queue", "weight": 1.0, "params": {}}
    assert ttft["params"] == {**by_name["params"], "new_slot_weight": 3}
    assert resolved["picker"] == {"name": "max_score", "params": {"tie_break": "random"}}


def test_summary_records_the_run_settings_and_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = _run(capsys, "--kv-capacity-tokens", "20000", "--drain-s", "30", "--out",
                   str(tmp_path / "run"))  # fmt: skip
    assert list(summary)[:2] == ["schema_version", "loragate_version"]
    assert summary["schema_version"] == 1
    assert summary["loragate_version"] == loragate.__version__
    cfg = summary["config"]
    assert cfg["workload"] == "demo" and cfg["workload_file"] == WORKLOAD
    assert cfg["drain_s"] == 30
    assert cfg["engine"]["kv_capacity_tokens"] == 20000 // 16 * 16
    assert cfg["engine"]["kv_capacity_from"] == "given"
    assert cfg["ttft_slo_ms"] == 1000 and cfg["starvation_wait_s"] == 60
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["config"] == cfg and on_disk["schema_version"] == 1

    from_profile = _run(capsys)["config"]["engine"]
    assert from_profile["kv_capacity_from"] == "profile"
    assert from_profile["kv_capacity_tokens"] > 20000


async def test_routing_sha256_is_the_one_a_gateway_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway whose routing: is the policy file's section shows the same sha256 in
    loragate_config_info: a planner can tell which simulated variant a deployment runs."""
    variant_file = _variant(tmp_path)
    simulated = _run(capsys, "--policy", str(variant_file))["config"]["routing"]["sha256"]
    routing = yaml.safe_load(variant_file.read_text(encoding="utf-8"))["routing"]
    gw_file = tmp_path / "gw.yaml"
    gw_file.write_text(
        yaml.safe_dump(
            {
                "base_model": "tiny-llama",
                "replicas": [{"id": "r0", "url": "http://127.0.0.1:9"}],
                "adapters": [{"name": "lora-0", "path": "/loras/lora-0"}],
                "routing": routing,
                "poller": {"interval_s": 3600},
            }
        ),
        encoding="utf-8",
    )
    async with (
        running_gateway(load_config(gw_file), port=0) as gw,
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/metrics") as resp,
    ):
        text = await resp.text()
    [line] = [x for x in text.splitlines() if x.startswith("loragate_config_info{")]
    assert f'sha256="{simulated}"' in line


# -- 2. a run owns its --out directory's outputs ---------------------------------------------


def test_an_earlier_runs_outputs_are_refused_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _run(capsys, "--out", str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"records.csv", "summary.json"}
    assert main([*BASE_ARGS, "--out", str(out), "--records", "jsonl", "--seed", "3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"loragate simulate: error: --out: {out} holds an earlier run's outputs (summary.json, "
        "records.csv): pass --overwrite to replace them, or choose another directory\n"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched


def test_overwrite_replaces_every_output_of_the_earlier_run_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _run(capsys, "--out", str(out), "--records", "jsonl")
    (out / "notes.txt").write_text("mine\n")
    (out / "records.csv.bak").write_text("kept\n")
    summary = _run(capsys, "--out", str(out), "--overwrite", "--seed", "3")
    assert sorted(p.name for p in out.iterdir()) == [
        "notes.txt",
        "records.csv",
        "records.csv.bak",
        "summary.json",
    ]  # no records.jsonl of the earlier run beside the new records.csv
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 3
    rows = (out / "records.csv").read_text().splitlines()
    assert len(rows) == 1 + summary["requests"]["total"]


def test_a_run_that_cannot_start_leaves_the_directory_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _run(capsys, "--out", str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    too_long = [*BASE_ARGS, "--max-model-len", "1000000"]
    assert main([*too_long, "--out", str(out), "--overwrite"]) == 2
    assert "--max-model-len" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    fresh = tmp_path / "fresh"
    assert main([*too_long, "--out", str(fresh)]) == 2
    capsys.readouterr()
    assert not fresh.exists()  # no empty records file from a run that never started


def test_claim_removes_only_the_outputs_a_run_writes(tmp_path: Path) -> None:
    """An interrupted run leaves records without summary.json; the next one (--overwrite)
    removes the earlier summary before it writes records, so a directory never holds one
    run's summary beside another's records."""
    for name in ("summary.json", "records.csv", "records.jsonl", "other.json", "records.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    claim(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json", "records.txt", "sub"]
    claim(tmp_path / "new" / "dir", overwrite=False)
    assert (tmp_path / "new" / "dir").is_dir()


# -- 3. readable text summary and errors -----------------------------------------------------


def test_text_summary_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*BASE_ARGS, "--max-loras", "2", "--max-cpu-loras", "5", "--policy", "loragate"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    assert header.startswith(
        "demo: 2 replicas (max_loras 2, max_cpu_loras 5, max_lora_rank 16), policy loragate "
        "(routing sha256 "
    ), header
    [loads] = [x for x in text.splitlines() if x.startswith("adapter loads")]
    assert re.fullmatch(r"adapter loads (\d+) \(r0 (\d+), r1 (\d+)\); deferred requests \d+", loads)
    m = re.match(r"adapter loads (\d+) \(r0 (\d+), r1 (\d+)\)", loads)
    assert m is not None and int(m[1]) == int(m[2]) + int(m[3])
    assert "{" not in text


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--max-model-len", "1000000"],
            "--max-model-len: 1000000 tokens do not fit in a replica's KV cache (65408 tokens, "
            "from profile fast's KV memory model for --max-loras 4 x --max-lora-rank 16): lower "
            "--max-model-len, or give --kv-capacity-tokens, a --profile with more KV memory, or "
            "lower --max-loras x --max-lora-rank (LoRA slots take KV memory)",
        ),
        (
            ["--kv-capacity-tokens", "1000"],
            "--max-model-len: 4096 tokens do not fit in a replica's KV cache (992 tokens, from "
            "--kv-capacity-tokens 1000): lower --max-model-len, or raise --kv-capacity-tokens",
        ),
    ],
)
def test_kv_cache_error_names_the_flags_that_size_it(
    extra: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*BASE_ARGS, *extra]) == 2
    assert capsys.readouterr().err == f"loragate simulate: error: {expected}\n"
