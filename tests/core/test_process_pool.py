"""``stop_pool`` ends a pool's workers through ``ProcessPoolExecutor._processes`` (no public
handle before Python 3.14) and must not fail where that is not a dict: after the pool was shut
down (``shutdown`` sets it to None: a second ``stop_pool``, or one after the ``with`` block,
raised AttributeError) or on a Python without it (the queue is still cancelled)."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor

import pytest

from loragate.core.process_pool import ignore_sigint, stop_pool


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
    pool = ProcessPoolExecutor(max_workers=1, initializer=ignore_sigint)
    running = pool.submit(_nap, 600)
    queued = [pool.submit(_nap, 600) for _ in range(4)]  # the first may sit in the call queue
    workers = list(pool._processes.values())
    stop_pool(pool)
    assert workers and all(_gone(w.pid) for w in workers)
    assert _never_ran([running, *queued])


def test_stop_pool_twice_and_after_the_pool_was_shut_down() -> None:
    pool = ProcessPoolExecutor(max_workers=1, initializer=ignore_sigint)
    assert pool.submit(_nap, 0).result() == 0
    workers = list(pool._processes.values())
    stop_pool(pool)
    stop_pool(pool)  # _processes is None now
    assert all(_gone(w.pid) for w in workers)
    with ProcessPoolExecutor(max_workers=1) as other:
        assert other.submit(_nap, 0).result() == 0
    stop_pool(other)  # after the with block's shutdown


def test_without_the_private_handle_the_queue_is_still_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = ProcessPoolExecutor(max_workers=1, initializer=ignore_sigint)
    pool.submit(_nap, 0.5)
    queued = [pool.submit(_nap, 600) for _ in range(4)]
    workers = dict(pool._processes)
    del pool._processes  # a Python whose executor keeps its workers elsewhere
    try:
        with caplog.at_level(logging.WARNING, logger="loragate.core.process_pool"):
            stop_pool(pool)
        assert _never_ran(queued[-1:])
        assert "no _processes dict" in caplog.text
    finally:
        for worker in workers.values():
            worker.terminate()
            worker.join()
