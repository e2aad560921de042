"""What a registry holds, described: every policy, filter, scorer and picker with its one-line
description and the parameters its factory reads (type, default, bounds, choices).

Nothing here is written by hand: each entry's factory is called once with a ``Params`` that
records every read (name, default, bounds, choices) on an empty parameter mapping, so the
listing is what the config reader accepts, and a parameter added to a factory shows up here
without another edit. ``loragate policies`` prints it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from loragate.routing.builtins import default_registry
from loragate.routing.config import picker_uses_scores
from loragate.routing.params import Params
from loragate.routing.registry import BuildEnv, Registry
from loragate.routing.step_time import LinearStepTimeModel

T = TypeVar("T", bound=str)

# The registry's name spaces, in the order a listing shows them: (kind, title).
KINDS: tuple[tuple[str, str], ...] = (
    ("policy", "policies"),
    ("filter", "filters"),
    ("scorer", "scorers"),
    ("picker", "pickers"),
)


@dataclass(frozen=True, slots=True)
class ParamInfo:
    """One parameter as its factory reads it.

    ``type``: ``number``, ``integer``, ``boolean``, ``choice`` or ``integer or null``;
    ``default`` the value taken when the parameter is left out (``None``: unbounded).
    """

    name: str
    type: str
    default: float | int | bool | str | None
    min_value: float | None = None
    max_value: float | None = None
    choices: tuple[str, ...] = ()

    def summary(self) -> str:
        """``number >= 1, default 1.25`` / ``one of random, first; default random``."""
        if self.choices:
            what = f"one of {', '.join(self.choices)};"
        else:
            lo, hi = self.min_value, self.max_value
            if lo is not None and hi is not None:
                bounds = f" in [{lo:g}, {hi:g}]"
            elif lo is not None:
                bounds = f" >= {lo:g}"
            elif hi is not None:
                bounds = f" <= {hi:g}"
            else:
                bounds = ""
            what = f"{self.type}{bounds},"
        return f"{what} default {_yaml_value(self.default)}"

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "type": self.type, "default": self.default}
        if self.min_value is not None:
            out["min"] = self.min_value
        if self.max_value is not None:
            out["max"] = self.max_value
        if self.choices:
            out["choices"] = list(self.choices)
        return out


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """One registry entry: ``kind`` is ``policy``, ``filter``, ``scorer`` or ``picker``;
    ``uses_scores`` (pickers only) whether it chooses by the totals (a composition with it needs
    a scorer) or ignores them (it takes none)."""

    kind: str
    name: str
    description: str
    params: tuple[ParamInfo, ...]
    uses_scores: bool | None = None

    def defaults(self) -> dict[str, float | int | bool | str | None]:
        return {p.name: p.default for p in self.params}

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name,
            "description": self.description,
            "params": [p.as_dict() for p in self.params],
        }
        if self.uses_scores is not None:
            out["uses_scores"] = self.uses_scores
        return out


def _yaml_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class _RecordingParams(Params):
    """A ``Params`` over an empty mapping that notes every parameter read, in reading order."""

    __slots__ = ("read",)

    def __init__(self, key: str) -> None:
        super().__init__(None, key)
        self.read: dict[str, ParamInfo] = {}

    def _note(self, info: ParamInfo) -> None:
        self.read.setdefault(info.name, info)

    def number(
        self,
        name: str,
        default: float,
        *,
        min_value: float | None = None,
        max_value: float | None = None,
    ) -> float:
        self._note(ParamInfo(name, "number", default, min_value, max_value))
        return super().number(name, default, min_value=min_value, max_value=max_value)

    def integer(self, name: str, default: int, *, min_value: int | None = None) -> int:
        self._note(ParamInfo(name, "integer", default, min_value))
        return super().integer(name, default, min_value=min_value)

    def optional_integer(self, name: str, *, min_value: int | None = None) -> int | None:
        self._note(ParamInfo(name, "integer or null", None, min_value))
        return super().optional_integer(name, min_value=min_value)

    def boolean(self, name: str, default: bool) -> bool:
        self._note(ParamInfo(name, "boolean", default))
        return super().boolean(name, default)

    def choice(self, name: str, default: T, choices: Sequence[T]) -> T:
        self._note(ParamInfo(name, "choice", default, choices=tuple(choices)))
        return super().choice(name, default, choices)


def describe(registry: Registry | None = None) -> dict[str, list[EntryInfo]]:
    """Every entry of ``registry`` (the built-ins by default), by kind, in registration order."""
    reg = registry if registry is not None else default_registry()
    env = BuildEnv(seed=0, step_time_model=LinearStepTimeModel())
    tables: Mapping[str, Mapping[str, Callable[[Params, BuildEnv], object]]] = {
        "policy": reg.profiles,
        "filter": reg.filters,
        "scorer": reg.scorers,
        "picker": reg.pickers,
    }
    out: dict[str, list[EntryInfo]] = {}
    for kind, _ in KINDS:
        entries = []
        for name, factory in tables[kind].items():
            params = _RecordingParams(f"routing.{name}")
            built = factory(params, env)
            description = reg.descriptions.get((kind, name), "")
            if not description and kind != "policy":  # a profile's class says nothing of it
                description = _first_line(built)
            uses_scores = picker_uses_scores(built) if kind == "picker" else None
            read = tuple(params.read.values())
            entries.append(EntryInfo(kind, name, description, read, uses_scores))
        out[kind] = entries
    return out


def _first_line(obj: object) -> str:
    """The first line of the built object's class docstring (a plugin registered without a
    description), or '' when it has none."""
    doc = type(obj).__doc__ or ""
    return doc.strip().split("\n", 1)[0].strip()
