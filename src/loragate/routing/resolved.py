"""A routing section in its canonical form, and the sha256 that identifies it.

``routing: loragate``, ``routing: {policy: loragate}`` and ``examples/policies/loragate.yaml``
(every parameter written out at its default) are one policy. :func:`resolved_routing` gives
each the same form: the policy (or each plugin of a composition) with every parameter its
factory reads, as given or else at the default ``loragate policies`` lists (taken from the same
registry, so they cannot drift), numbers as the factories read them (``2`` and ``2.0`` are one
value; a null is the default). ``loragate simulate`` shows it as ``config.routing.parameters``
in ``summary.json``.

:func:`routing_sha256` is the digest of that form and the seed: what the gateway shows as
``loragate_config_info{sha256}`` and ``loragate simulate`` records as ``config.routing.sha256``.
Equal digests mean the same policy with the same parameters and seed, however the section was
written; a section that changes one parameter differs from both.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from loragate.core.routing_digest import canonical_sha256
from loragate.routing.catalog import ParamInfo, describe


@functools.cache
def _builtin_params() -> dict[tuple[str, str], dict[str, ParamInfo]]:
    """Each built-in (kind, name)'s parameters (``describe`` builds every factory: once)."""
    return {
        (kind, entry.name): {p.name: p for p in entry.params}
        for kind, entries in describe().items()
        for entry in entries
    }


def _value(info: ParamInfo | None, value: object) -> object:
    """``value`` as the factory reads it: a number parameter as a float."""
    if info is None or value is None:
        return info.default if info is not None else value
    if info.type == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # (refused when the policy is built)
            return value
    return value


def _params(kind: str, name: str, given: object) -> dict[str, Any]:
    infos = _builtin_params().get((kind, name), {})
    written = dict(given) if isinstance(given, Mapping) else {}
    out: dict[str, Any] = {n: info.default for n, info in infos.items()}
    for n, v in written.items():
        out[n] = _value(infos.get(n), v)
    return out


def resolved_routing(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` (a section ``build_policy`` accepted) with every parameter resolved:
    ``{"policy": NAME, "params": {...}}`` for a built-in policy, else ``{"name": ...,
    "filters": [{"name", "params"}], "scorers": [{"name", "weight", "params"}],
    "picker": {"name", "params"}}``."""
    if isinstance(spec, str):
        return {"policy": spec, "params": _params("policy", spec, None)}
    if "policy" in spec:
        name = str(spec["policy"])
        rest = {k: v for k, v in spec.items() if k != "policy"}
        given = rest.get("params") if "params" in rest else rest
        return {"policy": name, "params": _params("policy", name, given)}

    def plugin(kind: str, item: object) -> dict[str, Any]:
        written: Mapping[str, Any] = item if isinstance(item, Mapping) else {"name": item}
        name = str(written["name"])
        out: dict[str, Any] = {"name": name}
        if kind == "scorer":
            weight = written.get("weight", 1.0)
            out["weight"] = _value(ParamInfo("weight", "number", 1.0), weight)
        out["params"] = _params(kind, name, written.get("params"))
        return out

    return {
        "name": spec.get("name", "custom"),
        "filters": [plugin("filter", f) for f in spec.get("filters") or []],
        "scorers": [plugin("scorer", s) for s in spec.get("scorers") or []],
        "picker": plugin("picker", spec.get("picker", "max_score")),
    }


def routing_sha256(spec: str | Mapping[str, Any], seed: int = 0) -> str:
    """The digest of a routing section whose policy spec (a name or a mapping, as
    ``build_policy`` takes it) is ``spec`` and whose ``seed`` is ``seed``: of its canonical
    form (:func:`resolved_routing`), so equivalent sections hash equal."""
    return canonical_sha256({"routing": resolved_routing(spec), "seed": seed})
