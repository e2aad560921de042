"""Pytest plugin: a test that leaves a resource open fails itself, not whichever test runs next.

An ``openai``/``aiohttp`` client, a stream writer or a subprocess transport left open by a
test is often kept alive by a reference cycle, so it is finalized only when the garbage
collector next runs: during some later test. Its finalizer then warns ("unclosed transport",
``ResourceWarning``) or fails ("Event loop is closed"), and with ``filterwarnings = error``
pytest turns that into an error of the later, innocent test (a flake that moves around).

Here a garbage collection at the end of each test's teardown finalizes what the test left
behind while pytest still attributes the warnings to that test: its teardown errors, naming
the leaked object (``PYTHONTRACEMALLOC=5`` adds where it was allocated)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_what_the_test_left_open() -> Iterator[None]:
    """Autouse fixtures are set up before the ones a test asks for, pytest-asyncio's event
    loop among them, so this teardown runs after theirs: the loop is closed, the tasks it
    held are gone. pytest reports the unraisable exceptions of a teardown at its end."""
    yield
    gc.collect()
    # What survived is alive: move it out of the collector's sight (into the permanent
    # generation), so the next test's collection walks only the objects made since. Without
    # this every collection walks the whole heap (the imports: ~0.1 s a test, minutes a suite).
    # Cost: a cycle among these survivors that becomes garbage later is not freed.
    gc.freeze()
