"""The built-in plugins and policies, registered by name in a fresh ``Registry``.

Built-in policies (each also usable as a baseline in comparisons):

===================  =====================================================================
``round_robin``      cycle through the healthy replicas
``least_loaded``     fewest in-flight + waiting requests; ties random (or first)
``consistent_hash``  hash ring on the adapter with bounded loads (``consistent_hash.py``)
``lora_affinity``    Gateway API Inference Extension LoRA affinity + queue + KV scorers
                     (``lora_affinity.py``)
``lru_multiplex``    Ray Serve model multiplexing: replicas holding the adapter, else the
                     least loaded (``multiplex.py``)
``loragate``         lowest expected time to first token (``expected_ttft.py``)
===================  =====================================================================
"""

from __future__ import annotations

from loragate.core.errors import ConfigError
from loragate.routing.consistent_hash import BoundedLoadFilter, HashRingScorer
from loragate.routing.expected_ttft import (
    SCORE_TAU_S,
    CostParams,
    ExpectedTTFTPicker,
    ExpectedTTFTScorer,
)
from loragate.routing.filters import KVUsageFilter, MaxLoadFilter, RegisteredFilter
from loragate.routing.framework import RoutingProfile, WeightedScorer
from loragate.routing.lora_affinity import LoraAffinityScorer
from loragate.routing.multiplex import FALLBACKS, MultiplexFilter
from loragate.routing.params import Params
from loragate.routing.pickers import (
    TIE_BREAKS,
    MaxScorePicker,
    PowerOfTwoPicker,
    RandomPicker,
    RoundRobinPicker,
    WeightedRandomPicker,
)
from loragate.routing.registry import BuildEnv, Registry
from loragate.routing.scorers import KVCacheScorer, LoadScorer, QueueScorer


def default_registry() -> Registry:
    """A new registry with every built-in filter, scorer, picker and policy."""
    reg = Registry()
    _register_plugins(reg)
    reg.add_profile("round_robin", _round_robin, "cycle through the healthy replicas")
    reg.add_profile(
        "least_loaded", _least_loaded, "fewest in-flight + waiting requests (scorer load)"
    )
    reg.add_profile(
        "consistent_hash",
        _consistent_hash,
        "hash ring on the adapter with bounded loads (filter bounded_load, scorer hash_ring)",
    )
    reg.add_profile(
        "lora_affinity",
        _lora_affinity,
        "Gateway API Inference Extension: scorers lora_affinity + queue + kv_cache, max_score",
    )
    reg.add_profile(
        "lru_multiplex",
        _lru_multiplex,
        "Ray Serve model multiplexing: replicas holding the adapter, least loaded among them "
        "(filter multiplex, scorer load)",
    )
    reg.add_profile(
        "loragate",
        _loragate,
        "lowest expected time to first token: queue, LoRA slot pressure, adapter load cost, "
        "step-time model (scorer expected_ttft)",
    )
    return reg


def _register_plugins(reg: Registry) -> None:
    # filters
    # filters ("fallback: true": a filter that would leave no replica keeps its input)
    reg.add_filter(
        "max_load",
        lambda p, env: MaxLoadFilter(
            p.integer("max_load", 64, min_value=0), fallback=p.boolean("fallback", True)
        ),
        "keeps replicas with at most max_load in-flight + waiting requests",
    )
    reg.add_filter(
        "max_kv_usage",
        lambda p, env: KVUsageFilter(
            p.number("max_usage", 0.9, min_value=0.0, max_value=1.0),
            fallback=p.boolean("fallback", True),
        ),
        "keeps replicas whose KV-cache usage (0-1) is at most max_usage",
    )
    reg.add_filter(
        "registered",
        lambda p, env: RegisteredFilter(fallback=p.boolean("fallback", True)),
        "keeps replicas where the adapter is registered (base-model requests pass)",
    )
    reg.add_filter(
        "bounded_load",
        lambda p, env: BoundedLoadFilter(_load_factor(p)),
        "keeps replicas with load + 1 <= ceil(load_factor * (total + 1) / n); never empties",
    )
    reg.add_filter(
        "multiplex",
        lambda p, env: _multiplex_filter(p),
        "keeps replicas holding the adapter (GPU slot or CPU cache), else the fallback's",
    )
    # scorers (each score in [0, 1], higher is better)
    reg.add_scorer(
        "load",
        lambda p, env: LoadScorer(),
        "fewer in-flight + waiting requests scores higher (min-max scaled; 1 when all equal)",
    )
    reg.add_scorer(
        "queue",
        lambda p, env: QueueScorer(),
        "shorter waiting queue scores higher (min-max scaled; the extension's queue-scorer)",
    )
    reg.add_scorer(
        "kv_cache", lambda p, env: KVCacheScorer(), "1 - KV-cache usage (free KV memory)"
    )
    reg.add_scorer(
        "lora_affinity",
        lambda p, env: LoraAffinityScorer(),
        "1.0 adapter active there, 0.8 a free LoRA slot, 0.6 adapter queued there, else 0",
    )
    reg.add_scorer(
        "hash_ring",
        lambda p, env: HashRingScorer(_virtual_nodes(p)),
        "1.0 for the replica met first walking the hash ring from the adapter, then lower",
    )
    reg.add_scorer(
        "expected_ttft",
        lambda p, env: ExpectedTTFTScorer(env.step_time_model, _cost_params(p)),
        f"the cheapest replica 1.0, others (c_min + tau) / (c + tau) of their expected time to "
        f"first token c (tau {SCORE_TAU_S * 1e3:g} ms): twice as slow ~0.5; with "
        "prefill_memory it remembers the prompts it saw routed, whatever the picker",
    )
    # pickers
    reg.add_picker(
        "max_score",
        lambda p, env: MaxScorePicker(p.choice("tie_break", "random", TIE_BREAKS)),
        "the highest total wins; ties: a random one or the first in replica order",
    )
    reg.add_picker("round_robin", lambda p, env: RoundRobinPicker(), "in turn, ignoring scores")
    reg.add_picker("random", lambda p, env: RandomPicker(), "uniformly random, ignoring scores")
    reg.add_picker(
        "weighted_random",
        lambda p, env: WeightedRandomPicker(),
        "random with probability proportional to the total (uniform when all are 0)",
    )
    reg.add_picker(
        "power_of_two",
        lambda p, env: PowerOfTwoPicker(),
        "two distinct replicas drawn at random, the higher total wins",
    )


def _round_robin(p: Params, env: BuildEnv) -> RoutingProfile:
    p.finish()
    return RoutingProfile(name="round_robin", picker=RoundRobinPicker(), seed=env.seed)


def _least_loaded(p: Params, env: BuildEnv) -> RoutingProfile:
    tie_break = p.choice("tie_break", "random", TIE_BREAKS)
    p.finish()
    return RoutingProfile(
        name="least_loaded",
        scorers=[WeightedScorer(1.0, LoadScorer())],
        picker=MaxScorePicker(tie_break),
        seed=env.seed,
    )


def _load_factor(p: Params) -> float:
    return p.number("load_factor", 1.25, min_value=1.0)


def _virtual_nodes(p: Params) -> int:
    return p.integer("virtual_nodes", 160, min_value=1)


def _consistent_hash(p: Params, env: BuildEnv) -> RoutingProfile:
    load_factor = _load_factor(p)
    virtual_nodes = _virtual_nodes(p)
    p.finish()
    return RoutingProfile(
        name="consistent_hash",
        filters=[BoundedLoadFilter(load_factor)],
        scorers=[WeightedScorer(1.0, HashRingScorer(virtual_nodes))],
        picker=MaxScorePicker("first"),
        seed=env.seed,
    )


def _lora_affinity(p: Params, env: BuildEnv) -> RoutingProfile:
    # The extension's default: every scorer at weight 1, max-score picker, random ties.
    affinity_w = p.number("affinity_weight", 1.0, min_value=0.0)
    queue_w = p.number("queue_weight", 1.0, min_value=0.0)
    kv_w = p.number("kv_weight", 1.0, min_value=0.0)
    p.finish()
    if affinity_w + queue_w + kv_w <= 0.0:
        raise ConfigError("every scorer weight is 0; at least one must be positive", key=p.key)
    return RoutingProfile(
        name="lora_affinity",
        scorers=[
            WeightedScorer(affinity_w, LoraAffinityScorer()),
            WeightedScorer(queue_w, QueueScorer()),
            WeightedScorer(kv_w, KVCacheScorer()),
        ],
        picker=MaxScorePicker("random"),
        seed=env.seed,
    )


def _multiplex_filter(p: Params) -> MultiplexFilter:
    return MultiplexFilter(
        max_ongoing_requests=p.optional_integer("max_ongoing_requests", min_value=1),
        include_registered=p.boolean("include_registered", False),
        fallback=p.choice("fallback", "least_loaded", FALLBACKS),
    )


def _lru_multiplex(p: Params, env: BuildEnv) -> RoutingProfile:
    flt = _multiplex_filter(p)
    choice = p.choice("choice", "least_loaded", ("least_loaded", "power_of_two"))
    p.finish()
    picker = MaxScorePicker("random") if choice == "least_loaded" else PowerOfTwoPicker()
    return RoutingProfile(
        name="lru_multiplex",
        filters=[flt],
        scorers=[WeightedScorer(1.0, LoadScorer())],
        picker=picker,
        seed=env.seed,
    )


def _cost_params(p: Params) -> CostParams:
    d = CostParams()
    return CostParams(
        default_rank=p.integer("default_rank", d.default_rank, min_value=1),
        mean_output_tokens=p.number("mean_output_tokens", d.mean_output_tokens, min_value=1.0),
        mean_prompt_tokens=p.number("mean_prompt_tokens", d.mean_prompt_tokens, min_value=1.0),
        length_ewma_alpha=p.number(
            "length_ewma_alpha", d.length_ewma_alpha, min_value=0.0, max_value=1.0
        ),
        hold_factor=p.number("hold_factor", d.hold_factor, min_value=0.0),
        new_slot_weight=p.number("new_slot_weight", d.new_slot_weight, min_value=0.0),
        congestion_weight=p.number("congestion_weight", d.congestion_weight, min_value=0.0),
        rho_max=p.number("rho_max", d.rho_max, min_value=0.0, max_value=0.999),
        register_s=p.number("register_s", d.register_s, min_value=0.0),
        own_length=p.boolean("own_length", d.own_length),
        load_stall_weight=p.number("load_stall_weight", d.load_stall_weight, min_value=0.0),
        gpu_miss_s=p.number("gpu_miss_s", d.gpu_miss_s, min_value=0.0),
        cpu_miss_s=p.number("cpu_miss_s", d.cpu_miss_s, min_value=0.0),
        kv_full=p.number("kv_full", d.kv_full, min_value=0.01, max_value=1.0),
        prefill_memory=p.boolean("prefill_memory", d.prefill_memory),
    )


def _loragate(p: Params, env: BuildEnv) -> RoutingProfile:
    scorer = ExpectedTTFTScorer(env.step_time_model, _cost_params(p))
    p.finish()
    return RoutingProfile(
        name="loragate",
        scorers=[WeightedScorer(1.0, scorer)],
        picker=ExpectedTTFTPicker(scorer, "random"),
        seed=env.seed,
    )
