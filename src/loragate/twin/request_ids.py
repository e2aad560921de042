"""Numbered request ids that are made only when read.

A simulation that queues a million requests would otherwise build a million id strings up front,
although under overload most requests never leave the waiting queue and their ids are never
read. :class:`NumberedIds` is a sequence of ids ``f"{prefix}{n}"`` for ``n`` in
``range(start, stop)``; :meth:`loragate.twin.engine.Engine.add_arrays` keeps such ids unmade
until a request is admitted (or looked up by id), and the records carry the same strings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload


class NumberedIds(Sequence[str]):
    """The ids ``f"{prefix}{start}"``, ..., ``f"{prefix}{stop - 1}"`` (a lazy ``Sequence[str]``)."""

    __slots__ = ("prefix", "start", "stop")

    def __init__(self, prefix: str, start: int, stop: int) -> None:
        self.prefix = prefix
        self.start = start
        self.stop = max(start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> NumberedIds: ...

    def __getitem__(self, i: int | slice) -> str | NumberedIds:
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                raise ValueError("NumberedIds: only contiguous slices")
            return NumberedIds(self.prefix, self.start + lo, self.start + max(lo, hi))
        n = len(self)
        if not -n <= i < n:
            raise IndexError("NumberedIds index out of range")
        return f"{self.prefix}{self.start + (i if i >= 0 else n + i)}"

    def __iter__(self) -> Iterator[str]:
        prefix = self.prefix
        return (f"{prefix}{k}" for k in range(self.start, self.stop))

    def __repr__(self) -> str:
        return f"NumberedIds({self.prefix!r}, {self.start}, {self.stop})"
