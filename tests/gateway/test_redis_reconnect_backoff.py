"""``state.reconnect_max_backoff_s``: while Redis is down, the gateway's store retries with a
backoff doubling from 0.1 s up to this cap (+ up to 20% jitter), so a returning Redis is
noticed within ~1.2 x the cap. Before, the cap was fixed at 5 s (``degraded`` cleared up to
~6 s after Redis came back) and the key was refused as unknown.

Against a real redis-server stopped and restarted on the same port; the store is built from a
config file as ``loragate serve`` builds it, on a virtual clock that the test advances, so the
attempts counted and the time to notice are virtual seconds: nothing here depends on how fast
the machine is."""

from __future__ import annotations

import itertools

import pytest

from loragate.core.clock import VirtualClock
from loragate.core.errors import ConfigError
from loragate.gateway.config_file import parse_config_text
from loragate.gateway.shared import build_store
from loragate.state import ResilientStore
from redis_fixture import RedisServer

STEP_S = 0.05  # virtual seconds between two maintenance rounds (the default interval)
DOWN_S = 30.0  # virtual seconds of outage
JITTER = 0.2  # ResilientStore's default


def _config(url: str, extra: str) -> str:
    return f"""\
base_model: m
replicas: ["http://127.0.0.1:1"]
state:
  backend: redis
  redis_url: {url}
  key_prefix: "t-backoff:"
{extra}"""


async def _outage(redis_server: RedisServer, cap_line: str) -> tuple[list[float], float]:
    """Reconnect attempts (virtual times) during a DOWN_S outage, and how long after Redis is
    back the store is in sync again (virtual seconds)."""
    cfg = parse_config_text(_config(redis_server.url, cap_line))
    clock = VirtualClock()
    store = build_store(cfg.state, clock=clock)
    assert isinstance(store, ResilientStore)
    try:
        await store.start()
        assert not store.degraded
        redis_server.stop()
        attempts: list[float] = []
        errors = store.error_count
        while clock.now() < DOWN_S:  # bounded: DOWN_S / STEP_S rounds
            await store.maintain()
            if store.error_count > errors:  # a reconnect attempt failed (one error each)
                attempts.append(clock.now())
                errors = store.error_count
            clock.advance_by(STEP_S)
        assert store.degraded
        redis_server.start()  # same port, empty
        back_s = clock.now()
        for _ in range(round(10.0 / STEP_S)):  # past the old 6 s; bounded
            await store.maintain()
            if not store.degraded:
                return attempts, clock.now() - back_s
            clock.advance_by(STEP_S)
        raise AssertionError(f"not back in sync 10 s after Redis returned ({store.error_count})")
    finally:
        await store.close()


async def test_a_small_cap_notices_a_returning_redis_sooner(redis_server: RedisServer) -> None:
    attempts, noticed_s = await _outage(redis_server, "  reconnect_max_backoff_s: 0.5\n")
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # Every wait is at most the cap plus its jitter (and one maintenance step of rounding).
    assert max(gaps) <= 0.5 * (1 + JITTER) + STEP_S + 1e-9, gaps
    # So over the outage: ~50 attempts, where the old fixed 5 s cap allows at most
    # 5 (0.1, 0.2, 0.4, 0.8, 1.6 s) + 25 / 5 = 10.
    assert len(attempts) >= DOWN_S / (0.5 * (1 + JITTER) + STEP_S) - 6, attempts
    # The returning Redis is noticed within one capped wait, not up to ~6 s later.
    assert noticed_s <= 0.5 * (1 + JITTER) + STEP_S + 1e-9, noticed_s


async def test_the_default_cap_is_5_s(redis_server: RedisServer) -> None:
    attempts, noticed_s = await _outage(redis_server, "")
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert 5.0 - STEP_S <= max(gaps) <= 5.0 * (1 + JITTER) + STEP_S + 1e-9, gaps
    assert noticed_s <= 5.0 * (1 + JITTER) + STEP_S + 1e-9


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("0", "must be a positive number of seconds, got 0"),
        ("-1", "must be a positive number of seconds, got -1"),
        ("fast", "expected a number of seconds, got str"),
    ],
)
def test_the_cap_must_be_a_positive_number_of_seconds(value: str, error: str) -> None:
    text = _config("redis://127.0.0.1:6379/0", f"  reconnect_max_backoff_s: {value}\n")
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, source="gw.yaml")
    assert str(info.value) == f"gw.yaml:7:3: state.reconnect_max_backoff_s: {error}"
