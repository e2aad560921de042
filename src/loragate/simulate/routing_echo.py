"""A routing section with every parameter resolved: what the policy actually ran with.

``--policy loragate`` and ``examples/policies/loragate.yaml`` (which lists every default) are
the same policy, though their sections (and so their sha256) differ; a file that changes one
parameter differs from both in that parameter alone. ``summary.json``'s
``config.routing.parameters`` shows this: each plugin's parameters as given, the others at the
defaults ``loragate policies`` lists (taken from the same registry, so they cannot drift).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loragate.routing.catalog import describe


def resolved_routing(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` (a section ``build_policy`` accepted) with every parameter resolved:
    ``{"policy": NAME, "params": {...}}`` for a built-in policy, else ``{"name": ...,
    "filters": [{"name", "params"}], "scorers": [{"name", "weight", "params"}],
    "picker": {"name", "params"}}``."""
    defaults = {
        (kind, entry.name): entry.defaults()
        for kind, entries in describe().items()
        for entry in entries
    }

    def params(kind: str, name: str, given: object) -> dict[str, Any]:
        written = dict(given) if isinstance(given, Mapping) else {}
        return {**defaults.get((kind, name), {}), **written}

    if isinstance(spec, str):
        return {"policy": spec, "params": params("policy", spec, None)}
    if "policy" in spec:
        name = str(spec["policy"])
        rest = {k: v for k, v in spec.items() if k != "policy"}
        given = rest.get("params") if "params" in rest else rest
        return {"policy": name, "params": params("policy", name, given)}

    def plugin(kind: str, item: object) -> dict[str, Any]:
        written: Mapping[str, Any] = item if isinstance(item, Mapping) else {"name": item}
        name = str(written["name"])
        out: dict[str, Any] = {"name": name}
        if kind == "scorer":
            out["weight"] = written.get("weight", 1.0)
        out["params"] = params(kind, name, written.get("params"))
        return out

    return {
        "name": spec.get("name", "custom"),
        "filters": [plugin("filter", f) for f in spec.get("filters") or []],
        "scorers": [plugin("scorer", s) for s in spec.get("scorers") or []],
        "picker": plugin("picker", spec.get("picker", "max_score")),
    }
