"""Signal handlers a command's own event loop must not leave behind.

uvloop leaves its handler on the signals its loop handled (``add_signal_handler``) after the
loop closed: in a process that goes on after a command ran in-process (``main([...])``),
Ctrl-C and SIGTERM were swallowed, and so in every child forked later (a process pool's worker
ignored ``terminate()``)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

LOOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signal_handlers_kept(signals: tuple[signal.Signals, ...] = LOOP_SIGNALS) -> Iterator[None]:
    """Put back, on exit, the handlers ``signals`` had on entry (those not installed from
    Python, ``getsignal`` None, are left alone)."""
    saved = {sig: signal.getsignal(sig) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
