"""The built-in plugins and policies, registered by name in a fresh ``Registry``.

Built-in policies (each also usable as a baseline in comparisons):

==================  ======================================================================
``round_robin``     cycle through the healthy replicas
``least_loaded``    fewest in-flight + waiting requests; ties random (or first)
==================  ======================================================================
"""

from __future__ import annotations

from loragate.routing.filters import KVUsageFilter, MaxLoadFilter, RegisteredFilter
from loragate.routing.framework import RoutingProfile, WeightedScorer
from loragate.routing.params import Params
from loragate.routing.pickers import (
    TIE_BREAKS,
    MaxScorePicker,
    PowerOfTwoPicker,
    RandomPicker,
    RoundRobinPicker,
    WeightedRandomPicker,
)
from loragate.routing.registry import BuildEnv, Registry
from loragate.routing.scorers import KVCacheScorer, LoadScorer, QueueScorer


def default_registry() -> Registry:
    """A new registry with every built-in filter, scorer, picker and policy."""
    reg = Registry()
    _register_plugins(reg)
    reg.add_profile("round_robin", _round_robin)
    reg.add_profile("least_loaded", _least_loaded)
    return reg


def _register_plugins(reg: Registry) -> None:
    # filters
    reg.add_filter(
        "max_load",
        lambda p, env: MaxLoadFilter(
            p.integer("max_load", 64, min_value=0), fallback=p.boolean("fallback", True)
        ),
    )
    reg.add_filter(
        "max_kv_usage",
        lambda p, env: KVUsageFilter(
            p.number("max_usage", 0.9, min_value=0.0, max_value=1.0),
            fallback=p.boolean("fallback", True),
        ),
    )
    reg.add_filter(
        "registered", lambda p, env: RegisteredFilter(fallback=p.boolean("fallback", True))
    )
    # scorers
    reg.add_scorer("load", lambda p, env: LoadScorer())
    reg.add_scorer("queue", lambda p, env: QueueScorer())
    reg.add_scorer("kv_cache", lambda p, env: KVCacheScorer())
    # pickers
    reg.add_picker(
        "max_score", lambda p, env: MaxScorePicker(p.choice("tie_break", "random", TIE_BREAKS))
    )
    reg.add_picker("round_robin", lambda p, env: RoundRobinPicker())
    reg.add_picker("random", lambda p, env: RandomPicker())
    reg.add_picker("weighted_random", lambda p, env: WeightedRandomPicker())
    reg.add_picker("power_of_two", lambda p, env: PowerOfTwoPicker())


def _round_robin(p: Params, env: BuildEnv) -> RoutingProfile:
    p.finish()
    return RoutingProfile(name="round_robin", picker=RoundRobinPicker(), seed=env.seed)


def _least_loaded(p: Params, env: BuildEnv) -> RoutingProfile:
    tie_break = p.choice("tie_break", "random", TIE_BREAKS)
    p.finish()
    return RoutingProfile(
        name="least_loaded",
        scorers=[WeightedScorer(1.0, LoadScorer())],
        picker=MaxScorePicker(tie_break),
        seed=env.seed,
    )
