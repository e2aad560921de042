"""Signal handlers a command's own event loop must not leave behind.

uvloop leaves its handler on the signals its loop handled (``add_signal_handler``) after the
loop closed: in a process that goes on after a command ran in-process (``main([...])``),
Ctrl-C and SIGTERM were swallowed, and so in every child forked later (a process pool's worker
ignored ``terminate()``)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

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


@contextlib.contextmanager
def signals_deferred(
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[None]:
    """``signals`` held back for the block (main thread only; elsewhere, and for a signal
    whose handler was not installed from Python, nothing is held): one that comes meanwhile is
    recorded and acted on when the block ends, by the handler it had (``SystemExit`` from
    ``sys.exit`` in it, ``KeyboardInterrupt`` from Python's default SIGINT one). For a step
    that must not be cut in two, e.g. starting a child and keeping its handle, so that the
    caller's cleanup knows of every child it has."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {}
    for sig in signals:
        handler = signal.getsignal(sig)
        if handler is not None:
            previous[sig] = handler
            signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(caught):
            handler = previous[signal.Signals(signum)]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)
