"""Ctrl-C in a command that runs work in a ``ProcessPoolExecutor``.

A terminal's Ctrl-C reaches the whole process group. Left alone, each worker raises
KeyboardInterrupt in its task (or prints a traceback if idle) and goes on with the next queued
one, while the parent's ``with ProcessPoolExecutor`` waits for the whole queue. With
:func:`ignore_sigint` as the pool's initializer and :func:`stop_pool` on the way out, the
parent alone decides: queued tasks are cancelled and running ones stopped at once.

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
machine. Once the thread has ended, the pipe is closed and the hook does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.process import BaseProcess
from types import FrameType

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


def _workers(pool: ProcessPoolExecutor) -> list[BaseProcess] | None:
    """The pool's worker processes, [] once it was shut down, None when they cannot be
    known. Python 3.11 has no public handle on them (3.14 has ``terminate_workers()``): this
    reads the private ``_processes`` dict, which ``shutdown`` sets to None."""
    processes = getattr(pool, "_processes", _MISSING)
    if processes is None:  # shut down before (by stop_pool too): nothing left to end here
        return []
    if not isinstance(processes, dict):
        return None
    return [p for p in processes.values() if isinstance(p, BaseProcess)]


_MISSING = object()


def _manager_thread(pool: ProcessPoolExecutor) -> threading.Thread | None:
    """The pool's manager thread (private ``_executor_manager_thread``; ``shutdown`` sets it
    to None), None when not started or not known."""
    thread = getattr(pool, "_executor_manager_thread", None)
    return thread if isinstance(thread, threading.Thread) else None


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and end the workers without waiting for their tasks (Python
    3.14's ``terminate_workers()``; ``shutdown`` alone lets every queued task run first).
    Safe to call twice, or after the pool was shut down: without a handle on the workers it
    cancels the queue and lets the running tasks finish, saying so in the log."""
    workers = _workers(pool)
    manager = _manager_thread(pool)  # read before shutdown forgets it
    pool.shutdown(wait=False, cancel_futures=True)
    if workers is None:
        log.warning(
            "stop_pool: this Python's ProcessPoolExecutor has no _processes dict; queued tasks "
            "are cancelled, running ones finish on their own"
        )
        return
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join()
    if manager is not None and manager is not threading.current_thread():
        manager.join(MANAGER_JOIN_S)
        if manager.is_alive():
            log.warning(
                "stop_pool: the pool's manager thread still runs after %g s", MANAGER_JOIN_S
            )
