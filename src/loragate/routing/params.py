"""Typed reading of plugin parameters from config, with errors that name the key path.

Every plugin factory reads its parameters through a ``Params`` and then calls ``finish()``, so an
unknown or mistyped parameter fails when the policy is built, never per request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

from loragate.core.config import misspelling
from loragate.core.errors import ConfigError

T = TypeVar("T", bound=str)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def check_number(value: object, key: str, *, min_value: float | None = None) -> float:
    """A finite real number (not a bool), at least ``min_value`` if given."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"must be a number, got {_type_name(value)} {value!r}", key=key)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float (10**400)
        raise ConfigError("must be a finite number, got one too large", key=key) from None
    if not math.isfinite(number):
        raise ConfigError(f"must be a finite number, got {value!r}", key=key)
    if min_value is not None and number < min_value:
        raise ConfigError(f"must be >= {min_value:g}, got {value!r}", key=key)
    return number


def check_mapping(value: object, key: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"must be a mapping, got {_type_name(value)} {value!r}", key=key)
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"keys must be strings, got {k!r}", key=key)
    return value


class Params:
    """Reads one plugin's parameter mapping; ``key`` is its path in the config file."""

    __slots__ = ("_raw", "_seen", "key")

    def __init__(self, raw: Mapping[str, object] | None, key: str) -> None:
        self._raw: Mapping[str, object] = check_mapping(raw, key) if raw is not None else {}
        self._seen: set[str] = set()
        self.key = key

    def _path(self, name: str) -> str:
        return f"{self.key}.{name}"

    def _get(self, name: str) -> object:
        self._seen.add(name)
        return self._raw.get(name)

    def number(
        self,
        name: str,
        default: float,
        *,
        min_value: float | None = None,
        max_value: float | None = None,
    ) -> float:
        value = self._get(name)
        if value is None:
            return default
        number = check_number(value, self._path(name), min_value=min_value)
        if max_value is not None and number > max_value:
            raise ConfigError(f"must be <= {max_value:g}, got {value!r}", key=self._path(name))
        return number

    def integer(self, name: str, default: int, *, min_value: int | None = None) -> int:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"must be an integer, got {_type_name(value)} {value!r}", key=self._path(name)
            )
        if min_value is not None and value < min_value:
            raise ConfigError(f"must be >= {min_value}, got {value!r}", key=self._path(name))
        return value

    def optional_integer(self, name: str, *, min_value: int | None = None) -> int | None:
        if self._raw.get(name) is None:
            self._seen.add(name)
            return None
        return self.integer(name, 0, min_value=min_value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(
                f"must be true or false, got {_type_name(value)} {value!r}", key=self._path(name)
            )
        return value

    def choice(self, name: str, default: T, choices: Sequence[T]) -> T:
        value = self._get(name)
        if value is None:
            return default
        for c in choices:
            if value == c:
                return c
        raise ConfigError(
            f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}",
            key=self._path(name),
        )

    def finish(self) -> None:
        """Fail on any parameter the plugin did not read (a typo, or a wrong plugin): with the
        nearest one it reads as a hint when one is close, else the list of them."""
        unknown = [k for k in self._raw if k not in self._seen]
        if unknown:
            hint = misspelling(unknown[0], self._seen)
            if hint is None:
                hint = f"this plugin takes: {', '.join(sorted(self._seen)) or 'none'}"
            raise ConfigError(f"unknown parameter ({hint})", key=self._path(unknown[0]))
