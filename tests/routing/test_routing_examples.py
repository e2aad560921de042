"""Every policy file under examples/policies builds and routes; every built-in has one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from loragate.core.types import ReplicaSnapshot, RoutingRequest
from loragate.routing import build_policy, default_registry
from loragate.routing.catalog import describe

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"
FILES = sorted(EXAMPLES.glob("*.yaml"))


def test_there_is_an_example_per_builtin_and_a_composed_one() -> None:
    names = {f.stem for f in FILES}
    assert set(default_registry().profiles) <= names
    specs = [yaml.safe_load(f.read_text(encoding="utf-8"))["routing"] for f in FILES]
    composed = [s for s in specs if isinstance(s, dict) and "policy" not in s]
    assert composed and all("scorers" in s for s in composed)


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_example_builds_and_routes(
    path: Path,
    snap: Callable[..., ReplicaSnapshot],
    req: Callable[..., RoutingRequest],
) -> None:
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))["routing"]
    policy = build_policy(spec, seed=0)
    if path.stem in default_registry().profiles:
        assert policy.name == path.stem
    reps = [snap("r0", in_flight=3, registered=["a"]), snap("r1", gpu=["a"], cpu=["a"])]
    assert policy.choose(req("a"), reps, policy.context()) in {"r0", "r1"}


BUILTIN_FILES = [f for f in FILES if f.stem in default_registry().profiles]


@pytest.mark.parametrize("path", BUILTIN_FILES, ids=[f.name for f in BUILTIN_FILES])
def test_builtin_example_lists_every_parameter_at_its_default(path: Path) -> None:
    """The built-in policies' examples say 'Every parameter, at its default': each holds the
    parameters `loragate policies` lists for it, each at the listed default (loragate.yaml
    said 'Values below are defaults' and left out load_stall_weight and prefill_memory)."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))["routing"]
    (entry,) = [e for e in describe()["policy"] if e.name == path.stem]
    params = {} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "policy"}
    assert params == entry.defaults()
    if entry.params:
        assert "Every parameter, at its default" in path.read_text(encoding="utf-8")
