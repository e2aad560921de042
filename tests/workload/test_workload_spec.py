"""Spec parsing: examples load and generate; every invalid value names its key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loragate.core.errors import ConfigError
from loragate.workload import Workload, load_spec, parse_spec_text, spec_from_mapping
from loragate.workload.spec import (
    DirichletPopularity,
    EmpiricalLength,
    LognormalLength,
    ZipfPopularity,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "workload").glob("*.yaml"))
SHARED_TRACES = REPO.parent / "shared" / "traces"

BASE: dict[str, Any] = {
    "duration_s": 60,
    "seed": 1,
    "adapters": {"count": 10, "ranks": {8: 0.5, 16: 0.5}, "popularity": {"kind": "zipf", "s": 1}},
    "arrivals": {"process": "gamma", "rate_rps": 5, "cv": 2},
    "lengths": {"prompt": {"kind": "lognormal", "mean": 100, "sigma": 0.5}, "output": 16},
}


def _with(path: str, value: object) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return data


_DELETE = object()


def test_examples_exist() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"zipf-200", "diurnal", "bursty", "servegen", "demo"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_loads_and_generates(path: Path) -> None:
    if path.stem == "servegen" and not (SHARED_TRACES / "servegen-alibaba-2025").is_dir():
        pytest.skip("shared ServeGen trace not present")
    spec = load_spec(path)
    wl = Workload(spec)
    assert len(wl.adapters) == spec.adapters.count
    n = 0
    last = -1.0
    for req in wl.requests():
        assert req.t_s >= last
        assert 0 <= req.t_s < spec.duration_s
        assert req.prompt_tokens >= 1 and req.max_tokens >= 1
        last = req.t_s
        n += 1
    expected = wl.offered_rate_rps * spec.duration_s
    assert n > 0
    # Loose: bursty processes vary a lot; this catches a rate off by a factor.
    assert 0.6 * expected < n < 1.4 * expected


def test_parse_example_values() -> None:
    spec = load_spec(REPO / "workload" / "zipf-200.yaml")
    assert spec.adapters.count == 200
    assert spec.adapters.popularity == ZipfPopularity(s=1.0)
    assert dict(spec.adapters.ranks) == pytest.approx({8: 0.34, 16: 0.33, 32: 0.33})
    assert spec.arrivals.process == "poisson"
    assert spec.arrivals.rate_rps == 50
    assert isinstance(spec.lengths.prompt, LognormalLength)
    assert spec.lengths.prompt.max == 4096


def test_popularity_string_shorthand() -> None:
    spec = spec_from_mapping(_with("adapters.popularity", "dirichlet"))
    assert spec.adapters.popularity == DirichletPopularity(alpha=1.0)


@pytest.mark.parametrize(
    ("path", "value", "key", "fragment"),
    [
        ("arrivals.cv", 0, "arrivals.cv", "must be > 0"),
        ("arrivals.cv", "x", "arrivals.cv", "expected a number"),
        ("arrivals.rate_rps", -1, "arrivals.rate_rps", "must be > 0"),
        ("arrivals.rate_rps", _DELETE, "arrivals.rate_rps", "is required"),
        ("arrivals.process", "hawkes", "arrivals.process", "must be one of"),
        ("arrivals.scope", "global", "arrivals.scope", "must be one of"),
        ("arrivals.burst", 1, "arrivals.burst", "unknown key"),
        ("arrivals.diurnal", {"amplitude": 1.5}, "arrivals.diurnal.amplitude", "must be <= 1"),
        ("arrivals.diurnal", {"period_s": 0}, "arrivals.diurnal.period_s", "must be >= 1"),
        ("arrivals.onoff", {"on_s": 1, "off_s": 1, "on_rate_rps": 2}, "arrivals.rate_rps", "onoff"),
        ("duration_s", 0, "duration_s", "must be > 0"),
        ("seed", -3, "seed", "must be >= 0"),
        ("seed", True, "seed", "expected an integer"),
        ("adapters.count", 0, "adapters.count", "must be >= 1"),
        ("adapters.ranks", {8: -1}, "adapters.ranks.8", "must be >= 0"),
        ("adapters.ranks", {0: 1}, "adapters.ranks", "must be >= 1"),
        ("adapters.popularity", {"kind": "zipf", "s": -1}, "adapters.popularity.s", ">= 0"),
        (
            "adapters.popularity",
            {"kind": "dirichlet", "alpha": 0},
            "adapters.popularity.alpha",
            ">",
        ),
        (
            "adapters.popularity",
            {"kind": "explicit", "weights": [1, 2]},
            "adapters.popularity.weights",
            "one weight per adapter",
        ),
        ("adapters.popularity", "pareto", "adapters.popularity.kind", "must be one of"),
        ("adapters.base_fraction", 1.0, "adapters.base_fraction", "must be < 1"),
        ("adapters.name_pattern", "same", "adapters.name_pattern", "duplicate"),
        ("adapters.name_pattern", "a-{j}", "adapters.name_pattern", "bad pattern"),
        ("lengths.prompt", {"kind": "lognormal", "mean": 100}, "lengths.prompt.sigma", "required"),
        ("lengths.prompt", {"kind": "uniform", "min": 10, "max": 5}, "lengths.prompt.max", ">= 10"),
        ("lengths.prompt", 0, "lengths.prompt", "must be >= 1"),
        ("lengths.prompt", [1, 2], "lengths.prompt", "expected a number or a mapping"),
        (
            "lengths.output",
            {"kind": "empirical"},
            "lengths.output",
            "exactly one of file or values",
        ),
        (
            "lengths.output",
            {"kind": "empirical", "values": [1, 2], "weights": [1]},
            "lengths.output.weights",
            "one weight per value",
        ),
        (
            "lengths.output",
            {"kind": "empirical", "file": "nope.csv", "column": "x"},
            "lengths.output.file",
            "file not found",
        ),
        ("lengths.max_total_tokens", 1, "lengths.max_total_tokens", ">= 2"),
    ],
)
def test_validation_error_names_the_key(path: str, value: object, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        spec_from_mapping(_with(path, value))
    assert exc.value.key == key
    assert fragment in str(exc.value)
    assert str(exc.value).startswith(f"{key}: ")


def test_cv_rejected_for_poisson() -> None:
    data = _with("arrivals.process", "poisson")
    with pytest.raises(ConfigError) as exc:
        spec_from_mapping(data)
    assert exc.value.key == "arrivals.cv"


def test_servegen_rejects_synthetic_keys(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("client_id,window_start_s,rate_rps,iat_cv,iat_dist,dist_param1,dist_param2\n")
    data = _with("arrivals", {"process": "servegen", "servegen": {"file": str(trace)}})
    with pytest.raises(ConfigError) as exc:
        spec_from_mapping(data)
    assert exc.value.key == "adapters.popularity"
    data["adapters"].pop("popularity")
    data["arrivals"]["rate_rps"] = 3
    with pytest.raises(ConfigError) as exc:
        spec_from_mapping(data)
    assert exc.value.key == "arrivals.rate_rps"
    data["arrivals"].pop("rate_rps")
    data["arrivals"]["servegen"]["offset_s"] = 100
    with pytest.raises(ConfigError) as exc:
        spec_from_mapping(data)
    assert exc.value.key == "arrivals.servegen.offset_s"


def test_items_rates_and_errors() -> None:
    items = [{"name": "a", "rank": 8, "rate_rps": 1.0}, {"name": "b", "rank": 16, "rate_rps": 3.0}]
    data = _with("adapters", {"items": items})
    data["arrivals"].pop("rate_rps")
    spec = spec_from_mapping(data)
    wl = Workload(spec)
    assert [a.name for a in wl.adapters] == ["a", "b"]
    assert [a.rank for a in wl.adapters] == [8, 16]
    assert wl.offered_rate_rps == pytest.approx(4.0)
    data["arrivals"]["rate_rps"] = 4
    with pytest.raises(ConfigError) as exc:
        spec_from_mapping(data)
    assert exc.value.key == "arrivals.rate_rps"
    dup = _with("adapters", {"items": [{"name": "a", "rank": 8}, {"name": "a", "rank": 8}]})
    with pytest.raises(ConfigError) as exc:
        spec_from_mapping(dup)
    assert exc.value.key == "adapters.items"
    bad = _with("adapters", {"items": [{"name": "a", "rank": 0}]})
    with pytest.raises(ConfigError) as exc:
        spec_from_mapping(bad)
    assert exc.value.key == "adapters.items[0].rank"


def test_yaml_errors_and_non_mapping() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_spec_text("a: [1, 2")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_spec_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as exc:
        load_spec("/nonexistent/spec.yaml")
    assert "cannot read" in str(exc.value)


def test_empirical_file_relative_to_spec(tmp_path: Path) -> None:
    (tmp_path / "lens.csv").write_text("p,o\n100,10\n200,0\n300,30\n")
    text = """
duration_s: 10
adapters: {count: 2}
arrivals: {rate_rps: 100}
lengths:
  prompt: {kind: empirical, file: lens.csv, column: p}
  output: {kind: empirical, file: lens.csv, column: o}
"""
    spec_file = tmp_path / "w.yaml"
    spec_file.write_text(text)
    spec = load_spec(spec_file)
    assert isinstance(spec.lengths.prompt, EmpiricalLength)
    assert spec.lengths.prompt.values == (100, 200, 300)
    assert isinstance(spec.lengths.output, EmpiricalLength)
    assert spec.lengths.output.values == (10, 1, 30)  # 0 tokens raised to 1
    prompts = np.concatenate([b.prompt_tokens for b in Workload(spec).batches()])
    assert set(prompts.tolist()) == {100, 200, 300}
    (tmp_path / "bad.yaml").write_text(text.replace("column: p", "column: q"))
    with pytest.raises(ConfigError) as exc:
        load_spec(tmp_path / "bad.yaml")
    assert exc.value.key == "lengths.prompt.file"
    assert "column 'q'" in str(exc.value)
