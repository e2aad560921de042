"""Change a workload spec's load from the command line: its rate and its number of adapters.

``loragate loadtest --rate-scale/--rate-rps`` and ``loragate simulate --rate-rps/--adapters``
answer "the same workload, at R req/s, with N adapters" without a copy of the spec file.

Every rate the spec states is multiplied by one factor (:func:`scale_rates`): the mean rate
(``rate_rps``), both on/off phases, explicit per-adapter rates, and a ServeGen replay's
``rate_scale``. Diurnal periods, burst lengths, popularity and lengths are unchanged, so
``--rate-scale 0.1`` replays the same day at a tenth of the traffic.

:func:`with_adapter_count` changes ``adapters.count``: a synthetic spec spreads its total rate
over that many adapters by its popularity law (rank mix, name pattern and seed kept); a ServeGen
replay (``select: top`` or ``sample``) replays that many clients, each at its own traced rate,
so its total rate changes with the count. Specs whose adapters are listed one by one
(``adapters.items``, explicit popularity weights, ``select: ids``) are refused: the list is the
count. A replay whose trace has fewer clients than ``--adapters`` is an error naming the flag
and the number of clients there are (:func:`naming_the_adapter_flag`), not the spec's
``adapters.count`` line the flag replaced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from loragate.core.errors import ConfigError
from loragate.workload.generator import Workload
from loragate.workload.parse import MAX_ADAPTERS, check_names
from loragate.workload.servegen import TooFewClientsError
from loragate.workload.spec import ExplicitPopularity, WorkloadSpec


def scale_rates(spec: WorkloadSpec, factor: float, *, key: str = "--rate-scale") -> WorkloadSpec:
    """``spec`` with every request rate multiplied by ``factor`` (> 0); ``key`` names the
    setting in the error."""
    if not (math.isfinite(factor) and factor > 0):
        raise ConfigError(f"must be > 0, got {factor:g}", key=key)
    arr = spec.arrivals
    onoff = arr.onoff
    if onoff is not None:
        onoff = replace(
            onoff,
            on_rate_rps=onoff.on_rate_rps * factor,
            off_rate_rps=onoff.off_rate_rps * factor,
        )
    servegen = arr.servegen
    if servegen is not None:
        servegen = replace(servegen, rate_scale=servegen.rate_scale * factor)
    arrivals = replace(
        arr,
        rate_rps=None if arr.rate_rps is None else arr.rate_rps * factor,
        onoff=onoff,
        servegen=servegen,
    )
    items = tuple(
        it if it.rate_rps is None else replace(it, rate_rps=it.rate_rps * factor)
        for it in spec.adapters.items
    )
    return replace(spec, arrivals=arrivals, adapters=replace(spec.adapters, items=items))


def with_total_rate(
    spec: WorkloadSpec, rate_rps: float, *, key: str = "--rate-rps"
) -> WorkloadSpec:
    """``spec`` with its rates scaled so that its mean total rate (adapters and base model,
    over the run) is ``rate_rps``."""
    if not (math.isfinite(rate_rps) and rate_rps > 0):
        raise ConfigError(f"must be > 0, got {rate_rps:g}", key=key)
    offered = Workload(spec).offered_rate_rps
    if offered <= 0:
        raise ConfigError("the spec offers no requests to scale", key=key)
    return scale_rates(spec, rate_rps / offered, key=key)


def with_adapter_count(spec: WorkloadSpec, count: int, *, key: str = "--adapters") -> WorkloadSpec:
    """``spec`` with ``count`` adapters (see the module's docstring for what that means)."""
    if not 1 <= count <= MAX_ADAPTERS:
        raise ConfigError(f"must be in [1, {MAX_ADAPTERS}], got {count}", key=key)
    a = spec.adapters
    sg = spec.arrivals.servegen
    if a.items:
        raise ConfigError(
            f"the spec lists its {len(a.items)} adapters one by one (adapters.items): "
            "edit that list instead",
            key=key,
        )
    if isinstance(a.popularity, ExplicitPopularity):
        raise ConfigError(
            f"the spec gives one popularity weight per adapter ({a.count}, adapters.popularity "
            "explicit): edit the weights instead",
            key=key,
        )
    if sg is not None and sg.select == "ids":
        raise ConfigError(
            f"the spec replays the {len(sg.client_ids)} ServeGen clients listed in "
            "arrivals.servegen.client_ids: edit that list, or use select: top or sample",
            key=key,
        )
    try:
        check_names(a.name_pattern, count, "adapters.name_pattern", servegen=sg is not None)
    except ConfigError as exc:
        raise ConfigError(f"the spec's {exc}", key=key) from exc
    return replace(spec, adapters=replace(a, count=count))


@contextmanager
def naming_the_adapter_flag(count: int | None, *, key: str = "--adapters") -> Iterator[None]:
    """Around building the :class:`Workload` of a spec whose adapter count ``count`` came from
    the flag ``key`` (None: from the spec): a trace with too few clients for it is a
    :class:`ConfigError` of ``key`` saying how many the trace has."""
    try:
        yield
    except ConfigError as exc:
        cause = exc if isinstance(exc, TooFewClientsError) else exc.__cause__
        if count is None or not isinstance(cause, TooFewClientsError):
            raise
        n, trace = cause.available, cause.trace.name
        has = (
            f"only {n} of the ServeGen trace {trace}'s clients are active in the replayed span "
            "(select: sample draws from those)"
            if cause.active_only
            else f"the ServeGen trace {trace} has only {n} clients"
        )
        raise ConfigError(f"{count} adapters asked, but {has}: give at most {n}", key=key) from exc


def trace_notes(
    given: WorkloadSpec, workload: Workload, *, adapters: int | None, rate_rps: float | None
) -> list[str]:
    """What ``--adapters`` and ``--rate-rps`` did to a ServeGen replay (``given`` is the spec
    before them, ``workload`` the one after), one line each; nothing for other specs."""
    before, after = given.arrivals.servegen, workload.spec.arrivals.servegen
    if before is None or after is None:
        return []
    notes = []
    if adapters is not None:
        which = "busiest" if before.select == "top" else "sampled (seeded)"
        total = (
            ""
            if rate_rps is not None
            else f" ({workload.offered_rate_rps:.3g} req/s in all; --rate-rps sets the total)"
        )
        notes.append(
            f"--adapters {adapters}: replays the trace's {adapters} {which} clients, "
            f"each at its traced rate{total}"
        )
    if rate_rps is not None:
        notes.append(
            f"--rate-rps {rate_rps:g}: every replayed window's request count is scaled by "
            f"{after.rate_scale / before.rate_scale:.4g} (rate_scale {before.rate_scale:g} -> "
            f"{after.rate_scale:.4g}); the trace's shape in time is kept"
        )
    return notes
