"""The routing framework: filters, scorers and a picker chained into a profile.

A routing decision runs, in order:

1. the implicit filters, in every profile, built-in or composed: health (an unhealthy replica
   never gets traffic) and rank (a replica whose ``max_lora_rank`` is known, said in its
   config, never gets an adapter of a higher rank: vLLM refuses to load it; ``rank_limit``);
2. each ``Filter`` of the profile, narrowing the candidate list;
3. each ``Scorer``, giving every candidate a score in [0, 1] (clamped here, whatever the scorer
   returns); the profile sums ``weight * score`` per candidate;
4. the ``Picker``, choosing one replica from the weighted totals;
5. each scorer that wants to know where the request went (a ``ChoiceObserver``, e.g. the
   ``expected_ttft`` scorer's prefill backlog) is told the chosen replica, whatever the picker.

(Steps 3 and 4 are one call when the profile's only scorer, at weight 1, is one its picker can
score with itself: a ``FusedPicker``, as in the ``loragate`` profile. Same choice.)

Everything is pure and synchronous: no I/O, no clocks read, no globals. Time and randomness come in
through the ``RoutingContext``; state kept across decisions (a round-robin counter, a hash ring)
lives inside the plugin objects of one profile.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from loragate.core.errors import NoReplicaAvailableError
from loragate.core.types import ReplicaId, ReplicaSnapshot, RoutingRequest
from loragate.routing.rank_limit import above_rank_limit


class NoCandidateError(NoReplicaAvailableError):
    """No replica can take the request (none healthy, or every one filtered out)."""


class RankLimitedError(NoCandidateError):
    """Every healthy candidate was left out because its known ``max_lora_rank`` is below the
    adapter's ``rank``: ``limited`` lists them, (replica, max_lora_rank), in candidate order
    (e.g. for a caller that left other replicas out itself and can say why)."""

    def __init__(
        self, message: str, *, rank: int, limited: Sequence[tuple[ReplicaId, int]]
    ) -> None:
        super().__init__(message, param="model")
        self.rank = rank
        self.limited = tuple(limited)


@dataclass(slots=True)
class RoutingContext:
    """Per-decision inputs besides the request and the replicas.

    ``now_s`` is the caller's clock (wall or virtual), ``rng`` a seeded random source shared by the
    caller across decisions (so a simulation is reproducible for a seed), ``scratch`` a dict for
    plugins of one decision to share intermediate results (e.g. each replica's load).
    """

    now_s: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    scratch: dict[str, object] = field(default_factory=dict)


class Filter(Protocol):
    """Narrows the candidate list. May return the input unchanged; must keep input order."""

    def filter(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Sequence[ReplicaSnapshot]: ...


class Scorer(Protocol):
    """Scores candidates; values outside [0, 1] are clamped, a missing replica scores 0.

    A scorer class may set ``bounded_scores = True`` to promise that it always returns every
    candidate, in candidate order, each with a finite value in [0, 1]; the profile then skips
    the clamping pass (a measurable share of a decision's cost).
    """

    def score(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> Mapping[ReplicaId, float]: ...


@runtime_checkable
class ChoiceObserver(Protocol):
    """Optional for a scorer: told the replica each decision it scored chose.

    A scorer with a ``chosen(ctx, replica_id)`` method (found once, when the profile is built)
    is called with the picked replica after the picker of a decision it scored has chosen,
    whichever picker that is, with the decision's ``ctx`` (its ``scratch`` as the scorer left
    it). A profile without such a scorer does nothing more per decision.
    """

    def chosen(self, ctx: RoutingContext, replica_id: ReplicaId) -> None: ...


class Picker(Protocol):
    """Chooses one replica from the weighted score totals (insertion order = candidate order)."""

    def pick(self, ctx: RoutingContext, scored: Mapping[ReplicaId, float]) -> ReplicaId: ...


@runtime_checkable
class FusedPicker(Protocol):
    """A picker that can also score: optional, for a profile whose only scorer (at weight 1,
    with ``bounded_scores``) is one this picker knows.

    If ``fuses_with(scorer)`` is true when the profile is built, every decision calls
    ``score_and_pick(ctx, req, candidates)`` instead of ``pick(ctx, scorer.score(ctx, req,
    candidates))``, which it must equal (same choice, same use of ``ctx``) for candidates with
    distinct replica ids; it may skip building the scores.
    """

    def pick(self, ctx: RoutingContext, scored: Mapping[ReplicaId, float]) -> ReplicaId: ...

    def fuses_with(self, scorer: Scorer) -> bool: ...

    def score_and_pick(
        self, ctx: RoutingContext, req: RoutingRequest, replicas: Sequence[ReplicaSnapshot]
    ) -> ReplicaId: ...


def load_of(replica: ReplicaSnapshot) -> int:
    """The load measure shared by the load-based policies: in-flight plus waiting requests."""
    return replica.in_flight + replica.num_waiting


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    weight: float
    scorer: Scorer


class RoutingProfile:
    """Filters, weighted scorers and one picker, applied in that order.

    Named ``RoutingProfile`` (not ``Profile``) to keep clear of the twin's performance profiles.
    """

    __slots__ = (
        "_direct",
        "_filters",
        "_fused",
        "_observers",
        "_picker",
        "_rng",
        "_scorers",
        "name",
    )

    def __init__(
        self,
        *,
        name: str,
        filters: Sequence[Filter] = (),
        scorers: Sequence[WeightedScorer] = (),
        picker: Picker,
        seed: int = 0,
    ) -> None:
        self.name = name
        self._filters = tuple(filters)
        self._scorers = tuple(
            (ws.weight, ws.scorer, bool(getattr(ws.scorer, "bounded_scores", False)))
            for ws in scorers
            if ws.weight > 0.0
        )
        # One promised-bounded scorer at weight 1: its scores are the totals.
        self._direct = (
            len(self._scorers) == 1 and self._scorers[0][0] == 1.0 and self._scorers[0][2]
        )
        # Scorers told each choice: once each, in scorer order (the same object listed twice
        # scores twice, but one request went to one replica).
        observers: dict[int, ChoiceObserver] = {}
        for _, scorer, _ in self._scorers:
            if isinstance(scorer, ChoiceObserver):
                observers.setdefault(id(scorer), scorer)
        self._observers = tuple(o.chosen for o in observers.values())
        self._picker = picker
        # That scorer and a picker that can do both at once: one call per decision.
        self._fused = (
            picker
            if self._direct
            and isinstance(picker, FusedPicker)
            and picker.fuses_with(self._scorers[0][1])
            else None
        )
        self._rng = random.Random(seed)

    @property
    def filters(self) -> tuple[Filter, ...]:
        return self._filters

    @property
    def scorers(self) -> tuple[WeightedScorer, ...]:
        return tuple(WeightedScorer(w, s) for w, s, _ in self._scorers)

    @property
    def picker(self) -> Picker:
        return self._picker

    def context(self, now_s: float = 0.0) -> RoutingContext:
        """A fresh context that shares this profile's seeded RNG (deterministic for a seed)."""
        return RoutingContext(now_s, self._rng, {})  # (positional: half the cost of keywords)

    def choose(
        self,
        request: RoutingRequest,
        replicas: Sequence[ReplicaSnapshot],
        ctx: RoutingContext | None = None,
    ) -> ReplicaId:
        """The replica to send ``request`` to; raises ``NoCandidateError`` if there is none."""
        if ctx is None:
            ctx = RoutingContext(0.0, self._rng, {})
        rank = request.adapter_rank
        candidates: Sequence[ReplicaSnapshot] = (
            [r for r in replicas if r.healthy]
            if rank is None
            else [
                r
                for r in replicas
                # ``rank_limit.within_rank_limit``, inlined: a call per replica per decision
                if r.healthy
                and (rank <= r.settings.max_lora_rank or not r.settings.max_lora_rank_known)
            ]
        )
        if not candidates and rank is not None:
            self._check_ranks(request, rank, replicas)
        for flt in self._filters:
            if not candidates:
                break
            candidates = flt.filter(ctx, request, candidates)
        if not candidates:
            what = "no healthy replica" if not any(r.healthy for r in replicas) else "no replica"
            raise NoCandidateError(
                f"{what} can serve model {request.adapter or '<base>'!r} "
                f"({len(replicas)} known, policy {self.name!r})",
                param="model",
            )
        if self._fused is not None:
            rid = self._fused.score_and_pick(ctx, request, candidates)
        elif self._direct:
            rid = self._picker.pick(ctx, self._scorers[0][1].score(ctx, request, candidates))
        else:
            totals: dict[ReplicaId, float] = dict.fromkeys([r.replica_id for r in candidates], 0.0)
            for weight, scorer, bounded in self._scorers:
                scores = scorer.score(ctx, request, candidates)
                if bounded:
                    for key, v in scores.items():
                        totals[key] += weight * v
                    continue
                for key in totals:
                    v = scores.get(key, 0.0)
                    if v > 1.0:
                        v = 1.0
                    elif not v >= 0.0:  # negative or NaN
                        v = 0.0
                    totals[key] += weight * v
            rid = self._picker.pick(ctx, totals)
        if self._observers:
            for chosen in self._observers:
                chosen(ctx, rid)
        return rid

    def _check_ranks(
        self, request: RoutingRequest, rank: int, replicas: Sequence[ReplicaSnapshot]
    ) -> None:
        """Raise the ``NoCandidateError`` that names the ranks when every healthy replica was
        left out for its ``max_lora_rank`` (none healthy: the caller's usual error)."""
        limited = [(r.replica_id, r.settings.max_lora_rank) for r in replicas if r.healthy]
        if limited:
            raise RankLimitedError(
                above_rank_limit(request.adapter or "<base>", rank, replicas, self.name),
                rank=rank,
                limited=limited,
            )


# The name other modules may use for "a routing policy".
Policy = RoutingProfile
