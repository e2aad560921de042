"""A small checked view of one YAML mapping: every read names its dotted key on error.

``Node(value, "arrivals")`` wraps a parsed mapping; ``node.get_float("cv", gt=0)`` reads
``arrivals.cv`` and raises :class:`ConfigError` with ``key="arrivals.cv"`` when it is missing,
of the wrong type or out of range. A node told which keys its mapping may have
(``Node(value, "arrivals", known=ARRIVALS_KEYS)``) rejects any other key as soon as it is made,
before a required key is found missing, with the nearest known key as a hint; :meth:`Node.finish`
rejects keys nobody read (a known key that these settings do not use).

:func:`naming_file` (``workload.yaml_file``, shared with the gateway's config file) puts the
file, and the line and column where the key is written, in front of an error raised inside it:
``w.yaml:7:3: arrivals.cv: expected a number, got 'high'``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final

from loragate.core.errors import ConfigError
from loragate.workload.yaml_file import SpecFileError as SpecFileError
from loragate.workload.yaml_file import naming_file as naming_file


class _Missing:
    __slots__ = ()


MISSING: Final = _Missing()


def type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def join_key(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def as_number(value: object, key: str) -> float:
    """A finite number (int, float or a numeric string such as YAML's ``1e3``)."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a number, got {type_name(value)}", key=key)
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            raise ConfigError(f"expected a number, got {value!r}", key=key) from None
    else:
        raise ConfigError(f"expected a number, got {type_name(value)}", key=key)
    if not math.isfinite(out):
        raise ConfigError(f"must be finite, got {value!r}", key=key)
    return out


def as_int(value: object, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"expected an integer, got {type_name(value)}", key=key)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ConfigError(f"expected an integer, got {value!r}", key=key)


def _num(value: float) -> str:
    """``100000`` rather than ``1e+05`` for whole numbers."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def check_range(
    value: float,
    key: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> None:
    if gt is not None and not value > gt:
        raise ConfigError(f"must be > {_num(gt)}, got {_num(value)}", key=key)
    if ge is not None and not value >= ge:
        raise ConfigError(f"must be >= {_num(ge)}, got {_num(value)}", key=key)
    if lt is not None and not value < lt:
        raise ConfigError(f"must be < {_num(lt)}, got {_num(value)}", key=key)
    if le is not None and not value <= le:
        raise ConfigError(f"must be <= {_num(le)}, got {_num(value)}", key=key)


def as_list(value: object, key: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"expected a list, got {type_name(value)}", key=key)
    return value


class Node:
    """A mapping being read; remembers which keys were read so :meth:`finish` finds typos."""

    __slots__ = ("_data", "_known", "_seen", "key")

    def __init__(self, value: object, key: str, known: Collection[str] | None = None) -> None:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {type_name(value)}", key=key or None)
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(f"keys must be strings, got {k!r}", key=key or None)
        self._data: Mapping[str, Any] = value
        self._known = known
        self._seen: set[str] = set()
        self.key = key
        if known is not None:
            for k in value:
                if k not in known:
                    raise ConfigError(_unknown(k, known), key=self.sub(k))

    def sub(self, name: str) -> str:
        return join_key(self.key, name)

    def has(self, name: str) -> bool:
        return name in self._data and self._data[name] is not None

    def raw(self, name: str, default: object = MISSING) -> Any:
        assert self._known is None or name in self._known, f"{self.sub(name)} is not declared"
        self._seen.add(name)
        if name in self._data and self._data[name] is not None:
            return self._data[name]
        if isinstance(default, _Missing):
            # Another key of this mapping may be it misspelt (a known key is not: off_s is not
            # a misspelt on_s); with known keys declared, any other was refused already.
            others = [k for k in self._data if k != name and k not in (self._known or ())]
            near = difflib.get_close_matches(name, others, n=1)
            hint = f" (is {near[0]!r} a misspelling of it?)" if near else ""
            raise ConfigError(f"is required{hint}", key=self.sub(name))
        return default

    def get_float(
        self,
        name: str,
        default: float | _Missing = MISSING,
        *,
        gt: float | None = None,
        ge: float | None = None,
        lt: float | None = None,
        le: float | None = None,
    ) -> float:
        value = self.raw(name, default)
        out = as_number(value, self.sub(name))
        check_range(out, self.sub(name), gt=gt, ge=ge, lt=lt, le=le)
        return out

    def opt_float(
        self, name: str, *, gt: float | None = None, ge: float | None = None
    ) -> float | None:
        if not self.has(name):
            self._seen.add(name)
            return None
        return self.get_float(name, gt=gt, ge=ge)

    def get_int(
        self,
        name: str,
        default: int | _Missing = MISSING,
        *,
        ge: int | None = None,
        le: int | None = None,
    ) -> int:
        value = self.raw(name, default)
        out = as_int(value, self.sub(name))
        check_range(out, self.sub(name), ge=ge, le=le)
        return out

    def get_str(
        self, name: str, default: str | _Missing = MISSING, *, choices: Sequence[str] = ()
    ) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {type_name(value)}", key=self.sub(name))
        if choices and value not in choices:
            raise ConfigError(
                f"must be one of {', '.join(choices)}; got {value!r}", key=self.sub(name)
            )
        return value

    def get_bool(self, name: str, default: bool | _Missing = MISSING) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", key=self.sub(name))
        return value

    def node(self, name: str, known: Collection[str] | None = None) -> Node:
        return Node(self.raw(name), self.sub(name), known)

    def opt_node(self, name: str, known: Collection[str] | None = None) -> Node | None:
        if not self.has(name):
            self._seen.add(name)
            return None
        return self.node(name, known)

    def finish(self) -> None:
        """Reject keys that were never read (misspelt, misplaced, or not used with the others)."""
        for k in self._data:
            if k not in self._seen:
                used = ", ".join(sorted(self._seen)) or "none"
                if self._known is not None and k in self._known:
                    what = f"not used with the other settings here (used: {used})"
                else:
                    what = f"unknown key (known here: {used})"
                raise ConfigError(what, key=self.sub(k))


def _unknown(name: str, known: Collection[str]) -> str:
    near = difflib.get_close_matches(name, sorted(known), n=1)
    if near:
        return f"unknown key (is {name!r} a misspelling of {near[0]!r}?)"
    return f"unknown key (known here: {', '.join(sorted(known))})"
