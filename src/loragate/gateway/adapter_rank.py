"""An adapter's LoRA rank, from its folder when the gateway can read it.

The rank feeds routing's load-cost estimates. The folder's ``adapter_config.json`` (PEFT's
format) says it in ``r``, so when the gateway can read the folder that is the rank, and a rank
given with the adapter (the config file's ``rank:``, ``POST /admin/adapters``' ``rank``) that
says otherwise is refused, naming both. When the folder is not readable here (the path is the
replicas', on another host, or a hub id), the given rank is taken, else 8 is assumed, and the
answer says which (``source``): ``adapter_config``, ``config``, ``request`` or ``default``.

A rank above the ``max_lora_rank`` of every replica, when the config says each one's
(``settings.max_lora_rank``), is one no replica can load (vLLM refuses it): :func:`rank_problem`
says so, for the config file (an error naming the key), ``POST /admin/adapters`` (a 400) and
the catalog (a request for such an adapter is a 400 before routing, with no load tried).
Routing leaves out each replica whose known ``max_lora_rank`` is below the adapter's rank
(``routing.rank_limit``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from loragate.core.config import ReplicaConfig
from loragate.core.errors import InvalidRequestError
from loragate.core.types import MAX_ADAPTER_RANK
from loragate.twin.adapters import ADAPTER_CONFIG, AdapterFolderError, read_adapter_folder

DEFAULT_RANK = 8


@dataclass(frozen=True, slots=True)
class RankLimits:
    """The replicas' ``max_lora_rank`` as their configs say it: ``ceiling`` is the highest when
    every replica says its own (None: some replica's is unknown, so any rank may be taken
    there, or there is no replica), ``described`` names each one (``r0: 16, r1: 8``)."""

    ceiling: int | None
    described: str

    @classmethod
    def of(cls, replicas: Sequence[ReplicaConfig]) -> RankLimits:
        known = [
            (r.replica_id, r.settings.max_lora_rank)
            for r in replicas
            if r.settings is not None and r.settings.max_lora_rank_known
        ]
        if not known or len(known) < len(replicas):
            return cls(None, "")
        return cls(max(m for _, m in known), ", ".join(f"{rid}: {m}" for rid, m in known))

    def problem(self, rank: int) -> str | None:
        """Why no replica can load an adapter of ``rank`` (None: some replica may)."""
        if self.ceiling is None or rank <= self.ceiling:
            return None
        return (
            f"LoRA rank {rank} is above the max_lora_rank of every replica ({self.described}; "
            "their settings.max_lora_rank), and vLLM refuses to load an adapter whose rank is "
            "above its --max-lora-rank"
        )


def rank_problem(rank: int, replicas: Sequence[ReplicaConfig]) -> str | None:
    """Why none of ``replicas`` can load an adapter of ``rank`` (None: one may)."""
    return RankLimits.of(replicas).problem(rank)


class RankAboveReplicasError(InvalidRequestError):
    """A request for an adapter whose rank is above every replica's known ``max_lora_rank``:
    a 400 (``param: model``), before routing, with no load tried."""


class RankError(ValueError):
    """The folder's rank cannot be used, or the given rank disagrees with it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SettledRank:
    rank: int
    source: str  # "adapter_config", the given rank's source, or "default"
    unread: str | None = None  # why the folder's rank was not read (None: it was)


def settle_rank(path: str, given: int | None, *, given_source: str) -> SettledRank:
    """The rank of the adapter at ``path``; ``given``: the rank given with it (None: none).
    Raises :class:`RankError` when the folder's ``r`` and ``given`` disagree, or ``r`` is
    above what loragate accepts. Blocking file I/O: call it off the event loop."""
    config_file = os.path.join(path, ADAPTER_CONFIG)
    try:
        folder = read_adapter_folder(os.path.expanduser(path))
    except AdapterFolderError as exc:
        unread = f"{config_file}: {exc}"
    else:
        if folder is not None:
            if given is not None and given != folder.rank:
                raise RankError(f"rank {given} disagrees with r = {folder.rank} in {config_file}")
            if folder.rank > MAX_ADAPTER_RANK:
                raise RankError(
                    f"r = {folder.rank} in {config_file} is above {MAX_ADAPTER_RANK}, the "
                    "highest rank loragate serves"
                )
            return SettledRank(rank=folder.rank, source="adapter_config")
        unread = f"the gateway cannot read {config_file}"
    if given is not None:
        return SettledRank(rank=given, source=given_source, unread=unread)
    return SettledRank(rank=DEFAULT_RANK, source="default", unread=unread)
