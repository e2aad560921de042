"""Names -> factories for filters, scorers, pickers and whole built-in profiles.

A factory reads its parameters through ``Params`` (which names the key path in errors) and gets
the ``BuildEnv`` (seed, step-time model). ``default_registry()`` returns a fresh registry holding
every built-in; callers may register their own plugins on it before building a policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from loragate.core.config import nearest
from loragate.core.errors import ConfigError
from loragate.routing.framework import Filter, Picker, RoutingProfile, Scorer
from loragate.routing.params import Params
from loragate.routing.step_time import StepTimeModel


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildEnv:
    """What a factory may need besides its parameters."""

    seed: int
    step_time_model: StepTimeModel


FilterFactory = Callable[[Params, BuildEnv], Filter]
ScorerFactory = Callable[[Params, BuildEnv], Scorer]
PickerFactory = Callable[[Params, BuildEnv], Picker]
# A profile factory gets the policy's parameters and returns a ready profile.
ProfileFactory = Callable[[Params, BuildEnv], RoutingProfile]
F = TypeVar("F")


class Registry:
    """Four name spaces: filters, scorers, pickers, profiles (built-in policies)."""

    __slots__ = ("filters", "pickers", "profiles", "scorers")

    def __init__(self) -> None:
        self.filters: dict[str, FilterFactory] = {}
        self.scorers: dict[str, ScorerFactory] = {}
        self.pickers: dict[str, PickerFactory] = {}
        self.profiles: dict[str, ProfileFactory] = {}

    def add_filter(self, name: str, factory: FilterFactory) -> None:
        _add(self.filters, "filter", name, factory)

    def add_scorer(self, name: str, factory: ScorerFactory) -> None:
        _add(self.scorers, "scorer", name, factory)

    def add_picker(self, name: str, factory: PickerFactory) -> None:
        _add(self.pickers, "picker", name, factory)

    def add_profile(self, name: str, factory: ProfileFactory) -> None:
        _add(self.profiles, "policy", name, factory)


def _add(table: dict[str, F], kind: str, name: str, factory: F) -> None:
    if name in table:
        raise ValueError(f"{kind} {name!r} is already registered")
    table[name] = factory


def lookup(table: dict[str, F], kind: str, name: object, key: str) -> F:
    """The factory called ``name``, or one ConfigError listing what exists, the nearest name
    first when one is close (``unknown policy 'loragte' (is it a misspelling of 'loragate'?;
    known: ...)``)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{kind} name must be a non-empty string, got {name!r}", key=key)
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table)) or "none"
        near = nearest(name, table)
        hint = "" if near is None else f"is it a misspelling of {near!r}?; "
        raise ConfigError(f"unknown {kind} {name!r} ({hint}known: {known})", key=key) from None
