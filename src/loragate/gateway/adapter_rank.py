"""An adapter's LoRA rank, from its folder when the gateway can read it.

The rank feeds routing's load-cost estimates. The folder's ``adapter_config.json`` (PEFT's
format) says it in ``r``, so when the gateway can read the folder that is the rank, and a rank
given with the adapter (the config file's ``rank:``, ``POST /admin/adapters``' ``rank``) that
says otherwise is refused, naming both. When the folder is not readable here (the path is the
replicas', on another host, or a hub id), the given rank is taken, else 8 is assumed, and the
answer says which (``source``): ``adapter_config``, ``config``, ``request`` or ``default``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from loragate.core.types import MAX_ADAPTER_RANK
from loragate.twin.adapters import ADAPTER_CONFIG, AdapterFolderError, read_adapter_folder

DEFAULT_RANK = 8


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
