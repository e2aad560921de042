"""``loragate serve`` under cProfile, switched on and off by signals, for
``bench/gateway_overhead.py --calls``.

Usage: python bench/_profiled_serve.py STATS_PATH serve --config ...

SIGUSR1 starts a fresh profile of the main thread (the event loop: the whole request path) and
creates ``STATS_PATH.on`` once it runs; SIGUSR2 stops it and writes its stats to ``STATS_PATH``
(pstats format, written whole: the file appears complete). The loragate tree is whatever
``import loragate`` finds (PYTHONPATH), so two trees can be compared.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
from pathlib import Path
from types import FrameType


def main() -> int:
    stats_path = Path(sys.argv[1])
    on_path = stats_path.with_name(stats_path.name + ".on")
    profiler: list[cProfile.Profile] = []

    def start(_sig: int, _frame: FrameType | None) -> None:
        profiler.clear()
        profiler.append(cProfile.Profile())
        profiler[0].enable()
        on_path.touch()

    def stop(_sig: int, _frame: FrameType | None) -> None:
        if not profiler:
            return
        profiler[0].disable()
        partial = stats_path.with_name(stats_path.name + ".part")
        profiler[0].dump_stats(partial)
        os.replace(partial, stats_path)
        on_path.unlink(missing_ok=True)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from loragate.cli import main as cli

    return cli(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
