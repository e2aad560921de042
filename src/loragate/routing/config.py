"""Building a routing policy from the config file's ``routing:`` section.

Accepted forms (``routing`` is the key path used in error messages):

* a built-in name: ``routing: least_loaded``;
* a built-in with parameters, inline or under ``params``::

      routing: {policy: consistent_hash, load_factor: 1.25, virtual_nodes: 160}
      routing: {policy: consistent_hash, params: {load_factor: 1.25}}

* a composition (``name`` and ``filters`` optional, ``picker`` defaults to ``max_score``;
  ``scorers`` required with a picker that uses scores, refused with ``random`` or
  ``round_robin``, which ignore them)::

      routing:
        name: my-affinity
        filters: [{name: max_load, params: {max_load: 64}}]
        scorers:
          - {name: lora_affinity, weight: 2}
          - {name: queue, weight: 1}
        picker: {name: max_score, params: {tie_break: random}}

Everything is checked here, once: a spec that expands to more than
``core.config.MAX_ROUTING_VALUES`` values (YAML aliases of aliases), unknown names, weights
that are not finite non-negative numbers (or are all zero), and parameters of the wrong type
fail with one ``ConfigError`` whose ``key`` names the offending path, e.g.
``routing.scorers[1].weight``. A misspelt key, parameter or name says which one was meant
when one is close, as the other sections' keys do (``routing.polcy: unknown key (is 'polcy'
a misspelling of 'policy'?)``, ``unknown policy 'loragte' (is it a misspelling of
'loragate'?; known: ...)``), else lists what is taken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loragate.core.config import check_routing_size, misspelling
from loragate.core.errors import ConfigError
from loragate.routing.builtins import default_registry
from loragate.routing.framework import Filter, RoutingProfile, WeightedScorer
from loragate.routing.params import Params, check_mapping, check_number
from loragate.routing.registry import BuildEnv, Registry, lookup
from loragate.routing.step_time import LinearStepTimeModel, StepTimeModel

_COMPOSITION_KEYS = ("name", "filters", "scorers", "picker")
# The keys that say which form a mapping is: a built-in policy, or a composition.
_FORM_KEYS = ("policy", "filters", "scorers", "picker")
_PLUGIN_KEYS = ("name", "params")
_SCORER_KEYS = ("name", "weight", "params")


def build_policy(
    spec: object,
    seed: int = 0,
    step_time_model: StepTimeModel | None = None,
    *,
    registry: Registry | None = None,
    key: str = "routing",
) -> RoutingProfile:
    """A ready ``RoutingProfile`` for ``spec``; raises ``ConfigError`` naming the bad key."""
    check_routing_size(spec, key)  # YAML aliases of aliases: bounded before anything walks it
    reg = registry if registry is not None else default_registry()
    env = BuildEnv(
        seed=seed,
        step_time_model=step_time_model if step_time_model is not None else LinearStepTimeModel(),
    )
    if isinstance(spec, str):
        factory = lookup(reg.profiles, "policy", spec, key)
        return factory(Params(None, key), env)
    raw = check_mapping(spec, key)
    if "policy" in raw:
        return _build_named(raw, env, reg, key)
    if not any(k in raw for k in _FORM_KEYS[1:]):
        for k in raw:  # 'polcy: NAME': say which key was meant
            if (hint := misspelling(k, _FORM_KEYS)) is not None:
                raise ConfigError(f"unknown key ({hint})", key=f"{key}.{k}")
        raise ConfigError(
            "needs 'policy: NAME' (one of "
            f"{', '.join(sorted(reg.profiles))}) or a composition of filters/scorers/picker",
            key=key,
        )
    return _build_composed(raw, env, reg, key)


def _build_named(
    raw: Mapping[str, object], env: BuildEnv, reg: Registry, key: str
) -> RoutingProfile:
    factory = lookup(reg.profiles, "policy", raw["policy"], f"{key}.policy")
    rest = {k: v for k, v in raw.items() if k != "policy"}
    if "params" in rest:
        extra = [k for k in rest if k != "params"]
        if extra:
            raise ConfigError(
                "give parameters either inline or under 'params'", key=f"{key}.{extra[0]}"
            )
        return factory(Params(check_mapping(rest["params"], f"{key}.params"), f"{key}.params"), env)
    return factory(Params(rest, key), env)


def _plugin_spec(
    item: object, key: str, allowed: Sequence[str]
) -> tuple[object, Mapping[str, object]]:
    """(name, raw item) of a list entry given as ``NAME`` or ``{name: NAME, ...}``."""
    if isinstance(item, str):
        return item, {}
    raw = check_mapping(item, key)
    for k in raw:
        if k not in allowed:
            hint = misspelling(k, allowed) or f"allowed: {', '.join(allowed)}"
            raise ConfigError(f"unknown key ({hint})", key=f"{key}.{k}")
    if "name" not in raw:
        raise ConfigError("missing 'name'", key=key)
    return raw["name"], raw


def _params(raw: Mapping[str, object], key: str) -> Params:
    value = raw.get("params")
    return Params(None if value is None else check_mapping(value, f"{key}.params"), f"{key}.params")


def _as_list(value: object, key: str) -> list[object]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"must be a list, got {type(value).__name__} {value!r}", key=key)
    return list(value)


def _build_composed(
    raw: Mapping[str, object], env: BuildEnv, reg: Registry, key: str
) -> RoutingProfile:
    for k in raw:
        if k not in _COMPOSITION_KEYS:
            hint = misspelling(k, _COMPOSITION_KEYS)
            if hint is None:
                hint = f"a composition takes: {', '.join(_COMPOSITION_KEYS)}"
            raise ConfigError(f"unknown key ({hint})", key=f"{key}.{k}")
    name = raw.get("name", "custom")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"must be a non-empty string, got {name!r}", key=f"{key}.name")

    filters: list[Filter] = []
    for i, item in enumerate(_as_list(raw.get("filters"), f"{key}.filters")):
        ikey = f"{key}.filters[{i}]"
        fname, fraw = _plugin_spec(item, ikey, _PLUGIN_KEYS)
        factory = lookup(reg.filters, "filter", fname, f"{ikey}.name" if fraw else ikey)
        params = _params(fraw, ikey)
        filters.append(factory(params, env))
        params.finish()

    scorers: list[WeightedScorer] = []
    items = _as_list(raw.get("scorers"), f"{key}.scorers")
    for i, item in enumerate(items):
        ikey = f"{key}.scorers[{i}]"
        sname, sraw = _plugin_spec(item, ikey, _SCORER_KEYS)
        sfactory = lookup(reg.scorers, "scorer", sname, f"{ikey}.name" if sraw else ikey)
        weight = 1.0
        if "weight" in sraw:
            weight = check_number(sraw["weight"], f"{ikey}.weight", min_value=0.0)
        params = _params(sraw, ikey)
        scorers.append(WeightedScorer(weight, sfactory(params, env)))
        params.finish()
    if scorers and all(s.weight == 0.0 for s in scorers):
        raise ConfigError(
            "every scorer weight is 0; at least one must be positive", key=f"{key}.scorers"
        )

    pkey = f"{key}.picker"
    pname, praw = _plugin_spec(raw.get("picker", "max_score"), pkey, _PLUGIN_KEYS)
    pfactory = lookup(reg.pickers, "picker", pname, f"{pkey}.name" if praw else pkey)
    pparams = _params(praw, pkey)
    picker = pfactory(pparams, env)
    pparams.finish()
    _check_picker_scorers(picker, pname, bool(scorers), key)

    return RoutingProfile(name=name, filters=filters, scorers=scorers, picker=picker, seed=env.seed)


def _check_picker_scorers(picker: object, name: object, has_scorers: bool, key: str) -> None:
    """A picker that chooses by the totals needs a scorer: without one every total is 0, and
    ``max_score`` would pick at random, unsaid. One that ignores them (``uses_scores = False``:
    ``random``, ``round_robin``) takes none: they would be computed for nothing."""
    uses_scores = picker_uses_scores(picker)
    if uses_scores and not has_scorers:
        raise ConfigError(
            f"no scorer: picker {name!r} chooses by the scorers' weighted totals, and with none "
            "every total is 0 (a choice at random); name at least one scorer (`loragate "
            "policies` lists them), or say 'picker: random' if random is what you want",
            key=f"{key}.scorers",
        )
    if not uses_scores and has_scorers:
        raise ConfigError(
            f"picker {name!r} ignores scores: the scorers would be computed for nothing; drop "
            "them, or pick by them with max_score, weighted_random or power_of_two",
            key=f"{key}.picker",
        )


def picker_uses_scores(picker: object) -> bool:
    """Whether ``picker`` chooses by the totals: unless its class says ``uses_scores = False``."""
    return bool(getattr(picker, "uses_scores", True))
