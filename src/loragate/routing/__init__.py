"""Pure, synchronous routing: filters, scorers and a picker composed into policies.

Public API::

    from loragate.routing import build_policy, RoutingContext, NoCandidateError

    policy = build_policy("least_loaded", seed=0)          # or the config's routing: mapping
    ctx = policy.context(now_s=clock.now())                # or RoutingContext(now_s=..., rng=...)
    replica_id = policy.choose(request, snapshots, ctx)    # NoCandidateError -> 503

``NoCandidateError`` subclasses ``loragate.core.errors.NoReplicaAvailableError``; its subclass
``RankLimitedError`` says every healthy candidate's known ``max_lora_rank`` is below the
adapter's rank (``routing.rank_limit``).
"""

from loragate.routing.builtins import default_registry
from loragate.routing.config import build_policy
from loragate.routing.framework import (
    ChoiceObserver,
    Filter,
    NoCandidateError,
    Picker,
    Policy,
    RankLimitedError,
    RoutingContext,
    RoutingProfile,
    Scorer,
    WeightedScorer,
    load_of,
)
from loragate.routing.params import Params
from loragate.routing.registry import BuildEnv, Registry
from loragate.routing.step_time import LinearStepTimeModel, StepTimeModel

__all__ = [
    "BuildEnv",
    "ChoiceObserver",
    "Filter",
    "LinearStepTimeModel",
    "NoCandidateError",
    "Params",
    "Picker",
    "Policy",
    "RankLimitedError",
    "Registry",
    "RoutingContext",
    "RoutingProfile",
    "Scorer",
    "StepTimeModel",
    "WeightedScorer",
    "build_policy",
    "default_registry",
    "load_of",
]
