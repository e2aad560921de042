"""Building policies from config: valid forms, and one clear ConfigError per bad key."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from loragate.core.errors import ConfigError
from loragate.core.types import ReplicaSnapshot, RoutingRequest
from loragate.routing import build_policy, default_registry

Snap = Callable[..., ReplicaSnapshot]
Req = Callable[..., RoutingRequest]

COMPOSED = {
    "name": "mine",
    "filters": ["registered", {"name": "max_load", "params": {"max_load": 10}}],
    "scorers": [{"name": "load", "weight": 2}, {"name": "kv_cache", "weight": 0.5}, "queue"],
    "picker": {"name": "max_score", "params": {"tie_break": "first"}},
}


def test_every_builtin_builds_by_name() -> None:
    for name in default_registry().profiles:
        assert build_policy(name).name == name


def test_params_inline_or_nested_are_equivalent(snap: Snap, req: Req) -> None:
    a = build_policy({"policy": "least_loaded", "tie_break": "first"})
    b = build_policy({"policy": "least_loaded", "params": {"tie_break": "first"}})
    reps = [snap("r0"), snap("r1")]
    assert [a.choose(req(), reps) for _ in range(5)] == ["r0"] * 5
    assert [b.choose(req(), reps) for _ in range(5)] == ["r0"] * 5


def test_composition_builds_and_routes(snap: Snap, req: Req) -> None:
    policy = build_policy(COMPOSED)
    assert policy.name == "mine"
    assert len(policy.filters) == 2 and len(policy.scorers) == 3
    reps = [
        snap("r0", in_flight=1, registered=["a"]),
        snap("r1", in_flight=0, registered=["b"]),  # least loaded but not registered
        snap("r2", in_flight=30, registered=["a"]),  # over max_load
    ]
    assert policy.choose(req("a"), reps) == "r0"


BAD: list[tuple[object, str, str]] = [
    ("nope", "routing", "unknown policy 'nope'"),
    (42, "routing", "must be a mapping"),
    ({"policy": "nope"}, "routing.policy", "unknown policy"),
    ({"policy": "least_loaded", "tie_break": "middle"}, "routing.tie_break", "must be one of"),
    ({"policy": "least_loaded", "tiebreak": "first"}, "routing.tiebreak", "unknown parameter"),
    ({"policy": "round_robin", "params": {"x": 1}}, "routing.params.x", "unknown parameter"),
    ({"policy": "round_robin", "params": [1]}, "routing.params", "must be a mapping"),
    ({"policy": "round_robin", "params": {}, "x": 1}, "routing.x", "either inline"),
    ({"weights": 1}, "routing", "needs 'policy: NAME'"),
    ({"scorers": ["load"], "extra": 1}, "routing.extra", "unknown key"),
    ({"scorers": "load"}, "routing.scorers", "must be a list"),
    ({"scorers": ["load", "nope"]}, "routing.scorers[1]", "unknown scorer 'nope'"),
    ({"scorers": [{"name": "nope"}]}, "routing.scorers[0].name", "unknown scorer"),
    ({"scorers": [{"weight": 1}]}, "routing.scorers[0]", "missing 'name'"),
    ({"scorers": ["load", {"name": "queue", "weight": -1}]}, "routing.scorers[1].weight", ">= 0"),
    ({"scorers": [{"name": "load", "weight": "heavy"}]}, "routing.scorers[0].weight", "number"),
    ({"scorers": [{"name": "load", "weight": True}]}, "routing.scorers[0].weight", "number"),
    (
        {"scorers": [{"name": "load", "weight": float("inf")}]},
        "routing.scorers[0].weight",
        "finite",
    ),
    (
        {"scorers": [{"name": "load", "weight": 0}, {"name": "queue", "weight": 0.0}]},
        "routing.scorers",
        "every scorer weight is 0",
    ),
    ({"scorers": [{"name": "load", "wieght": 1}]}, "routing.scorers[0].wieght", "unknown key"),
    (
        {"filters": [{"name": "max_load", "params": {"max_load": "ten"}}]},
        "routing.filters[0].params.max_load",
        "must be an integer",
    ),
    (
        {"filters": [{"name": "max_load", "params": {"max_load": -1}}]},
        "routing.filters[0].params.max_load",
        ">= 0",
    ),
    (
        {"filters": [{"name": "max_kv_usage", "params": {"max_usage": 1.5}}]},
        "routing.filters[0].params.max_usage",
        "<= 1",
    ),
    (
        {"filters": [{"name": "registered", "params": {"fallback": "yes"}}]},
        "routing.filters[0].params.fallback",
        "true or false",
    ),
    ({"picker": "nope"}, "routing.picker", "unknown picker"),
    (
        {"picker": {"name": "max_score", "params": {"tie": 1}}},
        "routing.picker.params.tie",
        "unknown parameter",
    ),
    ({"picker": {"name": 3}}, "routing.picker.name", "non-empty string"),
    ({"name": "", "picker": "random"}, "routing.name", "non-empty string"),
]


@pytest.mark.parametrize(("spec", "key", "text"), BAD)
def test_bad_config_names_the_key(spec: object, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_policy(spec)
    assert exc.value.key == key
    assert text in str(exc.value)
    assert str(exc.value).startswith(f"{key}: ")


def test_custom_key_prefix() -> None:
    with pytest.raises(ConfigError) as exc:
        build_policy({"policy": "nope"}, key="profiles[2]")
    assert exc.value.key == "profiles[2].policy"


def test_registry_rejects_duplicate_names() -> None:
    reg = default_registry()
    with pytest.raises(ValueError, match="already registered"):
        reg.add_scorer("load", lambda p, env: reg.scorers["queue"](p, env))


@pytest.mark.parametrize(
    "spec",
    [
        {"scorers": []},
        {"filters": ["registered"]},
        {"filters": ["registered"], "scorers": [], "picker": "max_score"},
        {"scorers": None, "picker": {"name": "weighted_random"}},
        {"scorers": [], "picker": "power_of_two"},
    ],
)
def test_a_picker_that_uses_scores_needs_a_scorer(spec: object) -> None:
    """With no scorer every total is 0 and max_score picks at random: refused, saying so,
    instead of a policy that looks score-driven and is not (it was accepted silently)."""
    with pytest.raises(ConfigError) as exc:
        build_policy(spec)
    assert exc.value.key == "routing.scorers"
    assert "no scorer" in str(exc.value) and "picker: random" in str(exc.value)


@pytest.mark.parametrize("picker", ["random", "round_robin"])
def test_a_picker_that_ignores_scores_takes_none(picker: str, snap: Snap, req: Req) -> None:
    policy = build_policy({"filters": ["registered"], "picker": picker})
    assert policy.choose(req("a"), [snap("r0", registered=["a"]), snap("r1")]) == "r0"
    with pytest.raises(ConfigError) as exc:
        build_policy({"scorers": ["load"], "picker": picker})
    assert exc.value.key == "routing.picker"
    assert "ignores scores" in str(exc.value)
