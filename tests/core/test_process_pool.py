"""``stop_pool`` ends a ``WorkerPool``'s workers, which the pool knows through its
multiprocessing context (no public handle on them before Python 3.14; it read the executor's
private ``_processes`` before), also after the pool was shut down (a second ``stop_pool``, or
one after the ``with`` block). It returns once the pool's manager thread has ended: Python
3.11's exit hook otherwise raced that thread for its wake-up pipe and printed a traceback after
a Ctrl-C's one line, now and then."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future
from concurrent.futures import process as futures_process

import pytest

from loragate.core.process_pool import WorkerPool, stop_pool


def _nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _gone(pid: int | None) -> bool:
    """Whether the process ``pid`` has ended and was reaped (by ``stop_pool``'s join or the
    pool's manager thread, which joins its workers too: ``is_alive()`` is unreliable then)."""
    assert pid is not None
    for _ in range(1200):  # bounded: 60 s
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _never_ran(futures: list[Future[float]]) -> bool:
    """Whether every future ended without its task's result (cancelled, or the pool broke)."""
    for _ in range(1200):  # the pool's manager thread settles them (bounded: 60 s)
        if all(f.done() for f in futures):
            break
        time.sleep(0.05)
    return all(f.done() and (f.cancelled() or f.exception() is not None) for f in futures)


def test_stop_pool_ends_running_workers_and_cancels_the_queue() -> None:
    pool = WorkerPool(1)
    running = pool.submit(_nap, 600)
    queued = [pool.submit(_nap, 600) for _ in range(4)]  # the first may sit in the call queue
    workers = pool.workers
    stop_pool(pool)
    assert workers and all(_gone(w.pid) for w in workers)
    assert _never_ran([running, *queued])


def test_stop_pool_twice_and_after_the_pool_was_shut_down() -> None:
    pool = WorkerPool(1)
    assert pool.submit(_nap, 0).result() == 0
    workers = pool.workers
    stop_pool(pool)
    stop_pool(pool)  # shut down already
    assert all(_gone(w.pid) for w in workers)
    with WorkerPool(1) as other:
        assert other.submit(_nap, 0).result() == 0
    stop_pool(other)  # after the with block's shutdown


def _pid() -> int:
    time.sleep(0.2)  # the other worker takes the next task
    return os.getpid()


def test_the_pool_knows_the_workers_that_run_its_tasks() -> None:
    with WorkerPool(2) as pool:
        ran_in = {f.result() for f in [pool.submit(_pid) for _ in range(6)]}
        workers = pool.workers
    assert len(workers) == 2
    assert ran_in <= {w.pid for w in workers}
    assert all(_gone(w.pid) for w in workers)  # the with block's shutdown ended them


def test_stop_pool_returns_once_the_manager_thread_has_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python 3.11's atexit hook (``_python_exit``) checks that the manager thread's wake-up
    pipe is open, then writes to it, while the thread closes it on seeing the workers gone:
    "Exception ignored ... Bad file descriptor" with a traceback, after "interrupted", on a
    busy machine (tests/twin/test_validate_interrupt.py). Once the thread has ended, the pipe
    is closed and the hook does nothing. The thread's closing is slowed down here so that a
    ``stop_pool`` that does not wait for it returns before (it did: the thread was alive)."""
    close = futures_process._ThreadWakeup.close

    def slow_close(self: futures_process._ThreadWakeup) -> None:
        time.sleep(0.5)
        close(self)

    monkeypatch.setattr(futures_process._ThreadWakeup, "close", slow_close)
    pool = WorkerPool(2)
    assert pool.submit(_nap, 0).result() == 0
    queued = [pool.submit(_nap, 600) for _ in range(4)]
    manager = pool._executor_manager_thread
    wakeup = pool._executor_manager_thread_wakeup
    assert isinstance(manager, threading.Thread) and wakeup is not None
    try:
        stop_pool(pool)
        assert not manager.is_alive()
        assert wakeup._closed  # the exit hook's wakeup() is a no-op now
        assert _never_ran(queued)
    finally:
        manager.join(60)  # bounded


def test_stop_pool_ends_workers_when_the_parent_swallows_sigterm() -> None:
    """A forked worker inherits the parent's SIGTERM handler. One that swallows it (uvloop's,
    left behind after ``loragate serve`` ran in-process) made ``terminate()`` do nothing:
    ``stop_pool`` waited in ``join()`` for the 600 s task (tests/core after tests/gateway hung)."""
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    try:
        pool = WorkerPool(1)
        running = pool.submit(_nap, 600)
        workers = pool.workers
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        time.sleep(0.5)  # let the worker take the task (the initializer ran before)
        stopper = threading.Thread(target=stop_pool, args=(pool,), daemon=True)
        stopper.start()
        stopper.join(60)  # bounded
        assert not stopper.is_alive(), "stop_pool still waits for a worker that got SIGTERM"
        assert all(_gone(w.pid) for w in workers)
        assert _never_ran([running])
    finally:
        for worker in workers:
            worker.kill()
        stopper.join(60)
