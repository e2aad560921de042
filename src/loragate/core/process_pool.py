"""Ctrl-C in a command that runs work in a ``ProcessPoolExecutor``.

A terminal's Ctrl-C reaches the whole process group. Left alone, each worker raises
KeyboardInterrupt in its task (or prints a traceback if idle) and goes on with the next queued
one, while the parent's ``with ProcessPoolExecutor`` waits for the whole queue. With a
:class:`WorkerPool` (:func:`ignore_sigint` as its initializer) and :func:`stop_pool` on the way
out, the parent alone decides: queued tasks are cancelled and running ones stopped at once.
Only public API: the pool knows its workers because its multiprocessing context (``mp_context``)
records the processes it makes.

A command that starts its child processes itself (``subprocess.Popen(...,
preexec_fn=ignore_sigint)``) starts each one under :func:`sigint_deferred`: a Ctrl-C that
lands while ``Popen`` runs (the child forked, not yet exec'd) raised KeyboardInterrupt inside
``Popen``, before the caller held the child to kill it, so the child ran on, ignoring Ctrl-C;
and one that reached the child before its ``preexec_fn`` printed the child's traceback.

:func:`stop_pool` also waits (bounded) for the pool's manager thread to end. Python 3.11's
``ProcessPoolExecutor`` has a race at exit: its atexit hook writes to the manager thread's
wake-up pipe while that thread, seeing the workers gone, closes it (the check and the write are
not under one lock; 3.12 takes a lock), which printed "Exception ignored ... Bad file
descriptor" (or a TypeError) with a traceback after "interrupted", now and then on a busy
machine. Once the thread has ended, the pipe is closed and the hook does nothing
(``shutdown(wait=True)`` joins it).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

MANAGER_JOIN_S = 30.0  # a hang guard: the thread ends as soon as it sees the workers gone


def ignore_sigint() -> None:
    """The pool's ``initializer`` (or a child's ``preexec_fn``): a worker ignores Ctrl-C; its
    parent handles it. SIGTERM gets its default action back: a forked worker inherits the
    parent's handler, and one that swallows it (uvloop's, left behind by a closed loop) made
    :func:`stop_pool`'s ``terminate()`` do nothing, and its join wait for the task."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Ctrl-C held back for the block (main thread only): a SIGINT meanwhile is recorded, and
    acted on when the block ends (KeyboardInterrupt, with Python's default handler). A child
    forked in the block inherits the recording handler until its ``preexec_fn``
    (:func:`ignore_sigint`) replaces it, so a Ctrl-C there does nothing either."""
    caught: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


class _RecordingContext(BaseContext):
    """The default start method's context, recording each process it makes: a pool given it
    as its ``mp_context`` makes its workers through it (``mp_context.Process``), so they are
    known without reading the executor's private state (Python 3.11 has no public handle on
    them; 3.14 has ``terminate_workers()``)."""

    def __init__(self) -> None:
        base = multiprocessing.get_context()
        self._make: Callable[..., BaseProcess] = base.Process
        self._method = base.get_start_method(allow_none=False)
        self.started: list[BaseProcess] = []

    def Process(self, *args: Any, **kwargs: Any) -> BaseProcess:  # the context API's name
        process = self._make(*args, **kwargs)
        self.started.append(process)
        return process

    def get_start_method(self, allow_none: bool = False) -> str:
        return self._method


class WorkerPool(ProcessPoolExecutor):
    """A ``ProcessPoolExecutor`` whose workers ignore Ctrl-C (:func:`ignore_sigint`) and that
    :func:`stop_pool` can stop at once: it knows its worker processes (:attr:`workers`)."""

    def __init__(self, max_workers: int) -> None:
        self._recorder = _RecordingContext()
        super().__init__(
            max_workers=max_workers, mp_context=self._recorder, initializer=ignore_sigint
        )

    @property
    def workers(self) -> list[BaseProcess]:
        """Every worker process the pool started (those ended too)."""
        return list(self._recorder.started)


def stop_pool(pool: WorkerPool) -> None:
    """Cancel what is queued and end the workers without waiting for their tasks (Python
    3.14's ``terminate_workers()``; ``shutdown`` alone lets every queued task run first), then
    wait (bounded) for the pool's manager thread to end: ``shutdown(wait=True)`` joins it, run
    in a thread of its own since it returns only once the workers ended. Safe to call twice,
    or after the pool was shut down."""
    workers = pool.workers
    stopper = threading.Thread(
        target=pool.shutdown,
        kwargs={"wait": True, "cancel_futures": True},
        name="loragate-stop-pool",
        daemon=True,
    )
    stopper.start()
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join()
    stopper.join(MANAGER_JOIN_S)
    if stopper.is_alive():
        log.warning("stop_pool: the pool's manager thread still runs after %g s", MANAGER_JOIN_S)
