"""Names -> factories for filters, scorers, pickers and whole built-in profiles.

A factory reads its parameters through ``Params`` (which names the key path in errors) and gets
the ``BuildEnv`` (seed, step-time model). ``default_registry()`` returns a fresh registry holding
every built-in; callers may register their own plugins on it before building a policy.

Each entry may carry a one-line description (``description=``); ``routing.catalog`` lists the
entries with it and the parameters their factories read (``loragate policies``).
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
    """Four name spaces: filters, scorers, pickers, profiles (built-in policies).

    ``descriptions`` maps ``(kind, name)`` (kind: ``filter``, ``scorer``, ``picker``,
    ``policy``) to the entry's one-line description, for those registered with one.
    """

    __slots__ = ("descriptions", "filters", "pickers", "profiles", "scorers")

    def __init__(self) -> None:
        self.filters: dict[str, FilterFactory] = {}
        self.scorers: dict[str, ScorerFactory] = {}
        self.pickers: dict[str, PickerFactory] = {}
        self.profiles: dict[str, ProfileFactory] = {}
        self.descriptions: dict[tuple[str, str], str] = {}

    def add_filter(self, name: str, factory: FilterFactory, description: str = "") -> None:
        _add(self.filters, "filter", name, factory)
        self._describe("filter", name, description)

    def add_scorer(self, name: str, factory: ScorerFactory, description: str = "") -> None:
        _add(self.scorers, "scorer", name, factory)
        self._describe("scorer", name, description)

    def add_picker(self, name: str, factory: PickerFactory, description: str = "") -> None:
        _add(self.pickers, "picker", name, factory)
        self._describe("picker", name, description)

    def add_profile(self, name: str, factory: ProfileFactory, description: str = "") -> None:
        _add(self.profiles, "policy", name, factory)
        self._describe("policy", name, description)

    def _describe(self, kind: str, name: str, description: str) -> None:
        if description:
            self.descriptions[(kind, name)] = description


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
