"""The value an ``adapter`` or ``tenant`` metric label gets (``metrics.adapter_labels``,
``metrics.tenant_labels``): with hundreds or thousands of adapters, one series per name in
every family that has the label is more than a Prometheus server takes from one target.

A :class:`LabelFold` maps a name to its label value, for the gateway's lifetime: Prometheus
keeps a series it scraped (a counter's or histogram's series that vanished would be read as a
reset, and one whose meaning changed corrupts ``rate()``), so a name that got its own value
keeps it, and one folded into ``OTHER`` stays folded. ``first_n`` keeps the first ``limit``
names: the ``seeds`` first (the config file's adapters or tenants, in file order), then those
counted (in the order the requests came), whatever their popularity later: a stable rule,
where "the top N by requests" would move names in and out of ``OTHER`` as traffic shifts. The
seeds make it the same rule on every instance reading one config file, and after a restart:
``sum by (adapter)`` over instances adds one adapter's series to the same adapter's, never to
another instance's ``OTHER`` (first-seen names alone differ by instance, as its traffic came).
Names no file lists (registered through the admin API) get the slots the seeds leave.
``listed`` keeps exactly the names ``metrics.*_label_names`` gives (any registration's),
the same everywhere whatever the traffic. The
empty name (the base model, or no tenant) is never folded, nor counted in ``limit``.
``OTHER`` is no name: the config and the admin API refuse it as an adapter's or a tenant's
(``core.config.RESERVED_LABEL``).

Per request this is a look-up in ``values`` (no Python call once a name was seen: the
telemetry reads ``values`` itself and calls :meth:`LabelFold.label` for a new name only).
``values`` holds every name seen (folded ones too): as many as the catalog's adapters and the
config's tenants over the gateway's lifetime, not the series.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from loragate.core.config import LABEL_MODES, RESERVED_LABEL

OTHER: Final = RESERVED_LABEL


class LabelFold:
    """The label value of a name under ``mode`` (one of ``LABEL_MODES``): ``values[name]``
    once :meth:`label` decided it. ``seeds``: with ``first_n``, names decided first, in
    order (the config file's); with ``listed``, the only names that keep their own value."""

    __slots__ = ("_named", "limit", "mode", "values")

    def __init__(self, mode: str = "all", limit: int = 20, seeds: Iterable[str] = ()) -> None:
        if mode not in LABEL_MODES:
            raise ValueError(f"label mode {mode!r} is not one of {LABEL_MODES}")
        self.mode = mode
        self.limit = limit
        self.values: dict[str, str] = {"": ""}
        self._named = 0  # names that got their own value (first_n)
        if mode == "first_n":
            for name in seeds:
                self.label(name)
        elif mode == "listed":  # every other name: OTHER, as label() finds no room for it
            self.values.update((name, name) for name in seeds)
            self._named = len(self.values) - 1

    def counts(self) -> tuple[int, int]:
        """How many names seen have their own value, and how many were folded into
        ``OTHER``."""
        return self._named, len(self.values) - 1 - self._named

    def label(self, name: str) -> str:
        """``name``'s label value, decided at its first call and kept."""
        value = self.values.get(name)
        if value is None:
            if self.mode == "all" or (self.mode == "first_n" and self._named < self.limit):
                value = name
                self._named += 1
            else:
                value = OTHER
            self.values[name] = value
        return value
