"""Shared builders for routing tests: compact snapshots and requests."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from loragate.core.types import ReplicaSettings, ReplicaSnapshot, Residency, RoutingRequest


def _snap(
    rid: str,
    *,
    in_flight: int = 0,
    waiting: int = 0,
    running: int = 0,
    deferred: int = 0,
    kv: float = 0.0,
    active: Iterable[str] = (),
    gpu: Iterable[str] = (),
    cpu: Iterable[str] = (),
    registered: Iterable[str] | None = None,
    max_loras: int = 4,
    max_cpu_loras: int = 8,
    max_num_seqs: int = 256,
    per_adapter: dict[str, int] | None = None,
    healthy: bool = True,
) -> ReplicaSnapshot:
    gpu_t, cpu_t = tuple(gpu), tuple(cpu)
    reg = frozenset(registered) if registered is not None else frozenset(gpu_t + cpu_t)
    return ReplicaSnapshot(
        replica_id=rid,
        url=f"http://127.0.0.1:1/{rid}",
        healthy=healthy,
        settings=ReplicaSettings(
            max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_num_seqs=max_num_seqs
        ),
        num_running=running,
        num_waiting=waiting,
        num_deferred=deferred,
        kv_usage=kv,
        active_adapters=frozenset(active),
        in_flight=in_flight,
        adapter_in_flight=dict(per_adapter or {}),
        residency=Residency(registered=reg, gpu=gpu_t, cpu=cpu_t),
    )


@pytest.fixture
def snap() -> Callable[..., ReplicaSnapshot]:
    return _snap


@pytest.fixture
def req() -> Callable[..., RoutingRequest]:
    counter = iter(range(1_000_000))

    def make(adapter: str | None = "a", **kw: int) -> RoutingRequest:
        return RoutingRequest(request_id=f"r{next(counter)}", adapter=adapter, **kw)  # type: ignore[arg-type]

    return make
