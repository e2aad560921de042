"""``loragate simulate`` on workloads unlike the shipped ones: every request accounted for,
rejections with a reason, vLLM's max_lora_rank choices, and command-line errors as one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loragate.cli import main
from loragate.core.errors import ConfigError
from loragate.simulate import SimRecord, Simulation, SimulationConfig
from loragate.workload import Workload, spec_from_mapping

SERVEGEN_HEADER = "client_id,window_start_s,rate_rps,iat_cv,iat_dist,dist_param1,dist_param2\n"


def _servegen_trace(tmp_path: Path) -> str:
    trace = tmp_path / "clients.csv"
    rows = [SERVEGEN_HEADER]
    for cid, rate, law in ((4, 0.5, "Weibull"), (8, 0.2, "Gamma"), (15, 0.05, "")):
        rows += [f"{cid},{w * 600},{rate * (1 + w % 2)},2,{law},0.5,1\n" for w in range(3)]
    trace.write_text("".join(rows))
    return str(trace)


def _specs(tmp_path: Path) -> dict[str, dict[str, Any]]:
    lengths = {"prompt": {"kind": "lognormal", "mean": 300, "sigma": 1.0}, "output": 40}
    return {
        "gamma-onoff-many-adapters": {
            "adapters": {"count": 40, "ranks": {8: 0.5, 64: 0.5}, "popularity": "uniform"},
            "arrivals": {
                "process": "gamma",
                "cv": 3,
                "onoff": {"on_s": 5, "off_s": 10, "on_rate_rps": 30, "durations": "exponential"},
            },
            "lengths": lengths,
        },
        "items-rates-base": {
            "adapters": {
                "items": [
                    {"name": "x", "rank": 4, "rate_rps": 3},
                    {"name": "y", "rank": 128, "rate_rps": 1},
                ],
                "base_fraction": 0.25,
            },
            "arrivals": {"process": "poisson", "diurnal": {"period_s": 20, "amplitude": 1}},
            "lengths": {"prompt": {"kind": "empirical", "values": [10, 3000]}, "output": 3000},
        },
        "servegen": {
            "adapters": {"count": 3, "ranks": 16},
            "arrivals": {
                "process": "servegen",
                "servegen": {"file": _servegen_trace(tmp_path), "time_scale": 30},
            },
            "lengths": lengths,
        },
    }


@pytest.mark.parametrize("name", ["gamma-onoff-many-adapters", "items-rates-base", "servegen"])
def test_every_generated_request_is_accounted_for(tmp_path: Path, name: str) -> None:
    spec = spec_from_mapping({"duration_s": 60, "seed": 2, **_specs(tmp_path)[name]})
    wl = Workload(spec)
    generated = list(wl.requests())
    records: list[SimRecord] = []
    config = SimulationConfig(replicas=2, policy="loragate", drain_s=5.0)
    summary = Simulation(wl, config).run(records.append).summary
    req = summary["requests"]
    assert len(records) == len(generated) == req["total"] > 20
    assert req["total"] == req["ok"] + req["rejected"] + req["unfinished"]
    assert sorted(int(r.request_id[1:]) for r in records) == list(range(len(generated)))
    assert sum(req["rejected_by_reason"].values()) == req["rejected"]
    assert all(bool(r.reason) == (r.status == "rejected") for r in records)
    assert summary["throughput"]["arrivals_per_s"] == pytest.approx(len(generated) / 60)


def test_rejections_name_their_reason_and_are_not_offered_load(tmp_path: Path) -> None:
    # Half the prompts (3000 tokens) plus max_tokens 3000 cannot fit max_model_len 4096.
    spec = spec_from_mapping({"duration_s": 60, "seed": 2, **_specs(tmp_path)["items-rates-base"]})
    records: list[SimRecord] = []
    summary = Simulation(Workload(spec), SimulationConfig(replicas=2)).run(records.append).summary
    rejected = [r for r in records if r.status == "rejected"]
    assert rejected and {r.reason for r in rejected} == {"context_length"}
    assert all(r.prompt_tokens + r.max_tokens > 4096 for r in rejected)
    assert summary["requests"]["rejected_by_reason"] == {"context_length": len(rejected)}
    served = sum(r.max_tokens for r in records if r.status != "rejected" and r.arrival_s <= 60)
    assert summary["throughput"]["offered_tokens_per_s"] == pytest.approx(served / 60)


@pytest.mark.parametrize(("ranks", "expected"), [({4: 1}, 8), ({8: 1, 48: 1}, 64), ({320: 1}, 320)])
def test_default_max_lora_rank_is_one_vllm_accepts(ranks: dict[int, float], expected: int) -> None:
    spec = spec_from_mapping(
        {
            "duration_s": 5,
            "adapters": {"count": 4, "ranks": ranks},
            "arrivals": {"rate_rps": 2},
        }
    )
    summary = Simulation(Workload(spec), SimulationConfig(replicas=1)).run().summary
    assert summary["config"]["engine"]["max_lora_rank"] == expected


def test_an_adapter_rank_vllm_cannot_serve_is_an_error() -> None:
    spec = spec_from_mapping(
        {"duration_s": 5, "adapters": {"count": 2, "ranks": 1024}, "arrivals": {"rate_rps": 2}}
    )
    with pytest.raises(ConfigError) as exc:
        Simulation(Workload(spec), SimulationConfig(replicas=1))
    assert exc.value.key == "max_lora_rank"
    assert "rank-1024 adapters; vLLM's largest is 512" in str(exc.value)


SPEC = """\
seed: 1
duration_s: 10
adapters: {count: 3}
arrivals: {process: poisson, rate_rps: 2, onoff: {on_s: 2, off_s: 3, on_rate_rps: 5, start: off}}
lengths: {prompt: 5000, output: 10}
"""


def test_cli_text_and_json_report_rejections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "long.yaml"
    spec.write_text(SPEC.replace("rate_rps: 2, ", ""))
    assert main(["simulate", "--workload", str(spec), "--replicas", "1"]) == 0
    text = capsys.readouterr().out
    assert "(context_length " in text
    assert "longer than --max-model-len 4096" in text
    assert main(["simulate", "--workload", str(spec), "--replicas", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    n = summary["requests"]["total"]
    assert n > 0 and summary["requests"]["rejected_by_reason"] == {"context_length": n}
    assert summary["starved"] is False  # nothing valid was offered, so nothing starved


def test_cli_workload_error_names_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "both.yaml"
    spec.write_text(SPEC)  # rate_rps and onoff together
    assert main(["simulate", "--workload", str(spec), "--replicas", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"loragate simulate: error: {spec}:4:30: arrivals.rate_rps: not used: the rate is set by "
        "arrivals.onoff\n"
    )


def test_cli_unwritable_out_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "ok.yaml"
    spec.write_text(SPEC.replace("rate_rps: 2, ", "").replace("5000", "50"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["simulate", "--workload", str(spec), "--replicas", "1", "--out", str(blocker / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loragate simulate: error: --out: cannot write ")
    assert f"{blocker} is not a directory" in err
    assert err.count("\n") == 1


def test_cli_no_requests_prints_a_dash_for_slo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "idle.yaml"
    spec.write_text(SPEC.replace("rate_rps: 2, ", "").replace("on_rate_rps: 5", "on_rate_rps: 1"))
    argv = ["simulate", "--workload", str(spec), "--replicas", "1", "--duration-s", "0.001"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "requests 0 " in out
    assert "TTFT SLO 1000 ms attained by -" in out
