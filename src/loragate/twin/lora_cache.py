"""GPU adapter slots and the CPU adapter cache of one vLLM replica, as two pinned LRUs.

vLLM keeps registered adapters in a CPU LRU of ``max_cpu_loras`` entries and active ones in an
LRU of ``max_loras`` GPU slots; an adapter used by the current batch cannot be evicted, and
evicting an adapter from the CPU cache also removes it from the GPU. Every adapter in the batch
is touched at every step, so recency is simply: adapters with running requests (pinned) are the
most recent; the others are ordered by the moment their last running request left. That lets the
engine update the caches only when an adapter enters or leaves the running set, never per step.

Both caches are insertion-ordered dicts: least recently used first.
"""

from __future__ import annotations


class LoraCaches:
    __slots__ = ("_cpu_idle", "_gpu_idle", "_pinned", "max_cpu", "max_gpu")

    def __init__(self, *, max_gpu: int, max_cpu: int) -> None:
        if max_gpu < 1 or max_cpu < max_gpu:
            raise ValueError(f"need 1 <= max_loras <= max_cpu_loras (got {max_gpu}, {max_cpu})")
        self.max_gpu = max_gpu
        self.max_cpu = max_cpu
        self._gpu_idle: dict[str, None] = {}  # on GPU (and CPU), no running request
        self._cpu_idle: dict[str, None] = {}  # in CPU cache, no running request (superset of gpu)
        self._pinned: dict[str, None] = {}  # running adapters: on GPU and CPU, first-arrival order

    def _make_cpu_room(self) -> None:
        while len(self._cpu_idle) + len(self._pinned) >= self.max_cpu and self._cpu_idle:
            victim = next(iter(self._cpu_idle))
            del self._cpu_idle[victim]
            self._gpu_idle.pop(victim, None)

    def _make_gpu_room(self) -> None:
        while len(self._gpu_idle) + len(self._pinned) >= self.max_gpu and self._gpu_idle:
            del self._gpu_idle[next(iter(self._gpu_idle))]

    def acquire(self, name: str) -> tuple[bool, bool]:
        """``name`` enters the running set. Returns (loaded_from_disk, loaded_from_memory)."""
        if name in self._gpu_idle:
            del self._gpu_idle[name]
            del self._cpu_idle[name]
            self._pinned[name] = None
            return False, False
        if name in self._cpu_idle:
            del self._cpu_idle[name]
            from_disk = False
        else:
            self._make_cpu_room()
            from_disk = True
        self._make_gpu_room()
        self._pinned[name] = None
        return from_disk, True

    def release(self, name: str) -> None:
        """The last running request of ``name`` left: it stays resident, now most recent."""
        del self._pinned[name]
        self._gpu_idle[name] = None
        self._cpu_idle[name] = None

    def preload(self, name: str, *, to_gpu: bool = False) -> tuple[bool, bool]:
        """Load ``name`` ahead of use (vLLM's static/runtime adapter registration).

        Returns (loaded_from_disk, loaded_to_gpu). An adapter already resident is just touched.
        """
        if name in self._pinned:
            return False, False
        from_disk = name not in self._cpu_idle
        on_gpu = name in self._gpu_idle
        if from_disk:
            self._make_cpu_room()
        else:
            del self._cpu_idle[name]
        self._cpu_idle[name] = None
        to_gpu_now = False
        if on_gpu:
            del self._gpu_idle[name]
            self._gpu_idle[name] = None
        elif to_gpu:
            self._make_gpu_room()
            if len(self._gpu_idle) + len(self._pinned) < self.max_gpu:
                self._gpu_idle[name] = None
                to_gpu_now = True
        return from_disk, to_gpu_now

    def rename(self, name: str, new_name: str) -> bool:
        """``name``'s idle entries, kept where they are in both LRUs, now read ``new_name``
        (False, nothing changed, if ``name`` is absent or running)."""
        if name not in self._cpu_idle:
            return False
        self._cpu_idle = {new_name if k == name else k: None for k in self._cpu_idle}
        self._gpu_idle = {new_name if k == name else k: None for k in self._gpu_idle}
        return True

    def remove(self, name: str) -> bool:
        """Drop an idle adapter from both caches (unload). Pinned adapters stay."""
        if name in self._pinned:
            return False
        self._gpu_idle.pop(name, None)
        return self._cpu_idle.pop(name, 0) is None

    def gpu(self) -> list[str]:
        return [*self._gpu_idle, *self._pinned]

    def cpu(self) -> list[str]:
        return [*self._cpu_idle, *self._pinned]

    def on_gpu(self, name: str) -> bool:
        return name in self._pinned or name in self._gpu_idle

    def in_cpu(self, name: str) -> bool:
        return name in self._pinned or name in self._cpu_idle
