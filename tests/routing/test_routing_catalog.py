"""routing.catalog lists every registry entry with the parameters its factory really reads."""

from __future__ import annotations

import dataclasses

import pytest

from loragate.core.errors import ConfigError
from loragate.routing import Params, build_policy, default_registry
from loragate.routing.catalog import KINDS, EntryInfo, describe
from loragate.routing.expected_ttft import CostParams
from loragate.routing.filters import RegisteredFilter
from loragate.routing.registry import BuildEnv

CATALOG = describe()
ENTRIES = [e for kind, _ in KINDS for e in CATALOG[kind]]


def test_every_registered_name_is_listed_with_a_description() -> None:
    reg = default_registry()
    tables = {"policy": reg.profiles, "filter": reg.filters, "scorer": reg.scorers}
    tables["picker"] = reg.pickers
    for kind, _ in KINDS:
        assert [e.name for e in CATALOG[kind]] == list(tables[kind])
    assert all(e.description for e in ENTRIES)


def _spec(entry: EntryInfo, params: dict[str, object]) -> object:
    """A routing section that uses ``entry`` with ``params``, alone or in a composition."""
    if entry.kind == "policy":
        return {"policy": entry.name, **params}
    item = {"name": entry.name, "params": params}
    if entry.kind == "picker":
        return {"scorers": ["load"] if entry.uses_scores else [], "picker": item}
    return {entry.kind + "s": [item], **({"scorers": ["load"]} if entry.kind == "filter" else {})}


@pytest.mark.parametrize("entry", ENTRIES, ids=[f"{e.kind}:{e.name}" for e in ENTRIES])
def test_listed_parameters_are_exactly_the_accepted_ones(entry: EntryInfo) -> None:
    # Every listed parameter at its listed default is accepted...
    build_policy(_spec(entry, entry.defaults()))
    # ... and one more is not: nothing the factory reads is missing from the listing.
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_policy(_spec(entry, {**entry.defaults(), "not_a_parameter": 1}))
    for p in entry.params:  # a listed bound is enforced
        if p.min_value is not None and p.min_value > 0:
            with pytest.raises(ConfigError, match=">="):
                build_policy(_spec(entry, {p.name: p.min_value - 1}))
        if p.choices:
            with pytest.raises(ConfigError, match="must be one of"):
                build_policy(_spec(entry, {p.name: "not-a-choice"}))


def test_listed_defaults_are_the_models_defaults() -> None:
    (loragate,) = [e for e in CATALOG["policy"] if e.name == "loragate"]
    assert loragate.defaults() == dataclasses.asdict(CostParams())
    (ttft,) = [e for e in CATALOG["scorer"] if e.name == "expected_ttft"]
    assert ttft.defaults() == loragate.defaults()


def test_summary_states_type_bounds_and_default() -> None:
    by_name = {(e.kind, e.name): {p.name: p for p in e.params} for e in ENTRIES}
    assert by_name[("policy", "consistent_hash")]["load_factor"].summary() == (
        "number >= 1, default 1.25"
    )
    assert by_name[("filter", "max_kv_usage")]["max_usage"].summary() == (
        "number in [0, 1], default 0.9"
    )
    assert by_name[("picker", "max_score")]["tie_break"].summary() == (
        "one of random, first; default random"
    )
    assert by_name[("filter", "multiplex")]["max_ongoing_requests"].summary() == (
        "integer or null >= 1, default null"
    )
    assert by_name[("policy", "loragate")]["own_length"].summary() == "boolean, default false"


def test_a_plugin_registered_without_description_shows_its_class_docstring() -> None:
    reg = default_registry()

    def factory(p: Params, env: BuildEnv) -> RegisteredFilter:
        return RegisteredFilter(fallback=p.boolean("strict", False))

    reg.add_filter("mine", factory)
    (mine,) = [e for e in describe(reg)["filter"] if e.name == "mine"]
    assert mine.description == RegisteredFilter.__doc__.split("\n")[0]  # type: ignore[union-attr]
    assert [(p.name, p.type, p.default) for p in mine.params] == [("strict", "boolean", False)]


@pytest.mark.parametrize("entry", CATALOG["picker"], ids=[e.name for e in CATALOG["picker"]])
def test_a_picker_listed_as_using_scores_needs_a_scorer_and_no_other(entry: EntryInfo) -> None:
    assert entry.uses_scores is (entry.name not in ("random", "round_robin"))
    with pytest.raises(ConfigError, match="no scorer" if entry.uses_scores else "ignores"):
        build_policy({"scorers": [] if entry.uses_scores else ["load"], "picker": entry.name})
    assert all(e.uses_scores is None for e in ENTRIES if e.kind != "picker")
