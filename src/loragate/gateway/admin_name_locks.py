"""One lock per adapter name for this instance's admin writes (``POST``/``PUT``/``DELETE
/admin/adapters``): two writes of one name run one after the other, each from its existence
check to its end, so that a second ``PUT`` neither overwrites the first's new path in the pool
(``ReplicaPool.begin_replace``) nor has it cleared when the first ends, and reads the
definition the first left in force. Writes of different names still run at once. A name's
lock is dropped once no write holds or waits for it: the table holds only names being
written."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class NameLocks:
    """``async with locks.held(name):`` runs the block alone among this instance's blocks of
    the same name (in arrival order: ``asyncio.Lock`` is fair)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # name -> lock, [users]

    def __len__(self) -> int:
        """How many names are being written (held or waited for)."""
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def held(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(name, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[name]
