"""Two simulated replicas in their own processes, which a test can pause (SIGSTOP) and resume,
and the admin calls the admin-write tests make against a gateway in front of them
(``admin_call``: ``shared_cluster``'s)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from chaos_replicas import SimReplica
from shared_cluster import admin_call

__all__ = ["adapter_roots", "admin_call", "paused_replicas", "signal_all"]


@contextlib.asynccontextmanager
async def paused_replicas(tmp_path: Path) -> AsyncIterator[list[SimReplica]]:
    """``r0`` and ``r1``, resumed (SIGCONT) and stopped at the end whatever the test did."""
    reps = [SimReplica(f"r{i}", tmp_path, seed=i, time_scale=1.0) for i in range(2)]
    try:
        for rep in reps:
            await rep.start()
        yield reps
    finally:
        for rep in reps:
            if rep.proc is not None and rep.proc.returncode is None:
                rep.proc.send_signal(signal.SIGCONT)
            await rep.stop()


def signal_all(reps: list[SimReplica], sig: signal.Signals) -> None:
    for rep in reps:
        assert rep.proc is not None
        rep.proc.send_signal(sig)


async def adapter_roots(http: aiohttp.ClientSession, reps: list[SimReplica], name: str) -> set[str]:
    """The paths the replicas that list ``name`` hold it from (their ``/v1/models`` roots)."""
    out = set()
    for rep in reps:
        async with http.get(rep.url + "/v1/models") as resp:
            listed = await resp.json()
        out |= {m["root"] for m in listed["data"] if m["id"] == name}
    return out
