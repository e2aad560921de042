"""Shadow residency: loragate's model of which adapters one vLLM replica holds.

vLLM 0.32 does not say which adapters sit in its GPU slots or CPU cache, so the gateway keeps
its own model, advanced by its routing decisions and admin calls. Pure functions on the frozen
``Residency`` value; the simulator and the gateway both use them, and the Redis store runs the
very same transitions as Lua (``state/lua.py``; a test checks they agree step by step).

The model follows vLLM's ``LRUCacheLoRAModelManager``: the CPU cache (``max_cpu_loras``) holds
every loaded adapter, *including* those active in a GPU slot (``max_loras``, a subset), and
activating an adapter touches it in both LRUs. Evicting an adapter from the CPU cache also
frees its GPU slot. Loading one (``/v1/load_lora_adapter``) activates it too
(``LRUCacheWorkerLoRAManager.add_adapter`` ends with ``activate_adapter``). So
``Residency.cpu`` here is the whole CPU cache, ``gpu`` ⊆ ``cpu`` after any sequence of these
transitions, and a replica holds at most ``max_cpu_loras`` adapters (not ``max_loras +
max_cpu_loras``). Slot pinning of adapters with running requests is not
modelled: routing decisions arrive in the order vLLM schedules them, closely enough.
"""

from __future__ import annotations

from collections.abc import Iterable

from loragate.core.types import AdapterId, ReplicaSettings, Residency

EMPTY = Residency()


def capacities(settings: ReplicaSettings) -> tuple[int, int]:
    """(GPU slots, CPU cache size), normalised as vLLM requires: 1 <= max_loras <= max_cpu."""
    gpu = max(1, settings.max_loras)
    return gpu, max(gpu, settings.max_cpu_loras)


def lru_touch(
    order: tuple[AdapterId, ...], item: AdapterId, capacity: int
) -> tuple[tuple[AdapterId, ...], tuple[AdapterId, ...]]:
    """Move ``item`` to the most-recent end; drop from the least-recent end down to capacity.

    Returns (new order, evicted items in eviction order).
    """
    kept = list(order)
    if item in kept:  # C-level scans: cheaper than a comprehension on the hot path
        kept.remove(item)
    kept.append(item)
    cut = len(kept) - capacity
    if cut <= 0:
        return tuple(kept), ()
    return tuple(kept[cut:]), tuple(kept[:cut])


def touch(res: Residency, adapter: AdapterId, settings: ReplicaSettings) -> Residency:
    """A request for ``adapter`` was routed to this replica: vLLM activates it.

    It becomes registered (the request would load it through the resolver), most recent in
    the CPU cache (evicting the cache's LRU, which also leaves its GPU slot) and most recent in
    the GPU slots (evicting the slots' LRU, which stays in the CPU cache).
    """
    gpu_cap, cpu_cap = capacities(settings)
    gpu, cpu, registered = res.gpu, res.cpu, res.registered
    if (
        gpu
        and gpu[-1] == adapter
        and cpu
        and cpu[-1] == adapter
        and adapter in registered
        and len(gpu) <= gpu_cap
        and len(cpu) <= cpu_cap
    ):
        return res  # already the most recent in both LRUs: nothing moves
    cpu, evicted = lru_touch(cpu, adapter, cpu_cap)
    if evicted:
        gpu = tuple(a for a in gpu if a not in evicted)
    gpu, _ = lru_touch(gpu, adapter, gpu_cap)
    if adapter not in registered:
        registered = registered | {adapter}
    return Residency(registered=registered, gpu=gpu, cpu=cpu)


def load(res: Residency, adapter: AdapterId, settings: ReplicaSettings) -> Residency:
    """Our admin call ``/v1/load_lora_adapter`` succeeded (a first load or ``load_inplace``).

    vLLM 0.32's ``add_lora`` reads the adapter into the CPU cache and then activates it
    (``LRUCacheWorkerLoRAManager.add_adapter`` ends with ``activate_adapter``): it takes a GPU
    slot at once, evicting the least recently used one when all are taken, whether or not a
    request for it follows. So a load moves the residency exactly as ``touch`` does.
    """
    return touch(res, adapter, settings)


def unload(res: Residency, adapter: AdapterId) -> Residency:
    """Our admin call ``/v1/unload_lora_adapter`` succeeded: the name is gone.

    vLLM 0.32 keeps the weights in its caches, but a request for the name gets 404 and a new
    load creates a new LoRA id, so for routing the adapter is not held any more.
    """
    return Residency(
        registered=res.registered - {adapter},
        gpu=tuple(a for a in res.gpu if a != adapter),
        cpu=tuple(a for a in res.cpu if a != adapter),
    )


def reconcile(res: Residency, seen: Iterable[AdapterId]) -> Residency:
    """A poll of ``/v1/models`` listed ``seen`` (the ids of cards with a ``parent``).

    ``/v1/models`` is authoritative for registration: names it lists are registered (even if
    someone else loaded them), names it does not list are dropped from every tier.
    """
    registered = frozenset(seen)
    return Residency(
        registered=registered,
        gpu=tuple(a for a in res.gpu if a in registered),
        cpu=tuple(a for a in res.cpu if a in registered),
    )


def tier(res: Residency, adapter: AdapterId) -> str:
    """Where the adapter is: ``gpu``, ``cpu``, ``registered`` (on disk) or ``absent``."""
    if adapter in res.gpu:
        return "gpu"
    if adapter in res.cpu:
        return "cpu"
    if adapter in res.registered:
        return "registered"
    return "absent"
