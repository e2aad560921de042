"""Ctrl-C in a command that runs work in a ``ProcessPoolExecutor``.

A terminal's Ctrl-C reaches the whole process group. Left alone, each worker raises
KeyboardInterrupt in its task (or prints a traceback if idle) and goes on with the next queued
one, while the parent's ``with ProcessPoolExecutor`` waits for the whole queue. With
:func:`ignore_sigint` as the pool's initializer and :func:`stop_pool` on the way out, the
parent alone decides: queued tasks are cancelled and running ones stopped at once.
"""

from __future__ import annotations

import signal
from concurrent.futures import ProcessPoolExecutor


def ignore_sigint() -> None:
    """The pool's ``initializer``: a worker ignores Ctrl-C; its parent handles it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and end the workers without waiting for their tasks (Python
    3.14's ``terminate_workers()``; ``shutdown`` alone lets every queued task run first)."""
    workers = list(pool._processes.values())  # no public handle before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join()
