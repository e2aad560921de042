"""Every policy, built-in or composed, leaves out a replica whose known ``max_lora_rank`` is
below the request's adapter rank (it would refuse to load the adapter); an assumed one (vLLM's
default, not said in the config) lets every rank through."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from loragate.core.types import ReplicaSettings, ReplicaSnapshot, RoutingRequest
from loragate.routing import NoCandidateError, RankLimitedError, build_policy, default_registry

Snap = Callable[..., ReplicaSnapshot]
Req = Callable[..., RoutingRequest]

COMPOSED = {
    "name": "composed",
    "filters": [{"name": "max_load", "params": {"max_load": 64}}, {"name": "registered"}],
    "scorers": [{"name": "lora_affinity", "weight": 2}, {"name": "queue", "weight": 1}],
    "picker": {"name": "weighted_random"},
}
POLICIES: list[object] = [*sorted(default_registry().profiles), COMPOSED]


def _limited(snap: ReplicaSnapshot, rank: int, *, known: bool = True) -> ReplicaSnapshot:
    settings = dataclasses.replace(snap.settings, max_lora_rank=rank, max_lora_rank_known=known)
    return dataclasses.replace(snap, settings=settings)


def _fleet(snap: Snap) -> list[ReplicaSnapshot]:
    # r0 is where every policy would send the adapter: it holds it in a GPU slot, idle, first
    # in order; but its --max-lora-rank is 8. r1 says nothing (vLLM's 16 assumed), r2 says 32.
    return [
        _limited(snap("r0", gpu=["a"], active=["a"]), 8),
        _limited(snap("r1", in_flight=6, waiting=2, kv=0.5), 16, known=False),
        _limited(snap("r2", in_flight=9, waiting=3, kv=0.7), 32),
    ]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p if isinstance(p, str) else "composed")
def test_no_policy_sends_an_adapter_above_a_known_max_lora_rank(
    policy: object, snap: Snap, req: Req
) -> None:
    fleet = _fleet(snap)
    # Without the limits, the policy does send 'a' to r0 (so the limit is what keeps it off).
    unlimited = [_limited(s, s.settings.max_lora_rank, known=False) for s in fleet]
    profile = build_policy(policy, seed=3)
    assert "r0" in {profile.choose(req("a", adapter_rank=16), unlimited) for _ in range(40)}
    profile = build_policy(policy, seed=3)
    for rank, allowed in ((16, {"r1", "r2"}), (32, {"r1", "r2"}), (64, {"r1"})):
        chosen = {profile.choose(req("a", adapter_rank=rank), fleet) for _ in range(40)}
        assert chosen <= allowed, (rank, chosen)
    # Within r0's rank, r0 is chosen as before.
    assert "r0" in {profile.choose(req("a", adapter_rank=8), fleet) for _ in range(40)}


def test_a_replica_within_rank_is_chosen_whatever_its_place_on_the_ring(
    snap: Snap, req: Req
) -> None:
    # consistent_hash: the ring's first replica for 'a' is left out when its rank is too low;
    # the next one on the ring takes it.
    profile = build_policy("consistent_hash", seed=0)
    fleet = [snap(f"r{i}") for i in range(4)]
    first = profile.choose(req("a", adapter_rank=8), fleet)
    limited = [_limited(s, 8) if s.replica_id == first else s for s in fleet]
    again = {profile.choose(req("a", adapter_rank=16), limited) for _ in range(10)}
    assert first not in again and len(again) == 1


def test_no_healthy_replica_within_rank_is_a_no_candidate_error_naming_the_numbers(
    snap: Snap, req: Req
) -> None:
    profile = build_policy("least_loaded")
    fleet = [
        _limited(snap("r0"), 8),
        _limited(snap("r1"), 16),
        _limited(snap("r2", healthy=False), 64),  # could take it, but is down
    ]
    with pytest.raises(NoCandidateError) as info:
        profile.choose(req("big", adapter_rank=32), fleet)
    message = info.value.message
    assert message.startswith(
        "no candidate replica can take model 'big': its LoRA rank 32 is above the "
        "max_lora_rank of r0 (8), r1 (16); r2, which could, is unhealthy"
    ), message
    assert info.value.param == "model"
    assert isinstance(info.value, RankLimitedError)
    assert (info.value.rank, info.value.limited) == (32, (("r0", 8), ("r1", 16)))
    # No replica healthy at all: the usual error, not about ranks.
    down = [dataclasses.replace(s, healthy=False) for s in fleet]
    with pytest.raises(NoCandidateError) as info:
        profile.choose(req("big", adapter_rank=32), down)
    assert not isinstance(info.value, RankLimitedError)
    assert info.value.message.startswith("no healthy replica can serve model 'big'")


def test_settings_from_the_config_say_whether_max_lora_rank_is_known() -> None:
    from loragate.core.config import config_from_mapping

    cfg = config_from_mapping(
        {
            "base_model": "m",
            "replicas": [
                {"url": "http://127.0.0.1:1", "settings": {"max_lora_rank": 32}},
                {"url": "http://127.0.0.1:2", "settings": {"max_loras": 2}},
                {"url": "http://127.0.0.1:3"},
            ],
        }
    )
    settings = [r.settings for r in cfg.replicas]
    assert settings[0] == ReplicaSettings(max_lora_rank=32, max_lora_rank_known=True)
    assert settings[1] is not None and not settings[1].max_lora_rank_known
    assert settings[2] is None
