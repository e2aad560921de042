"""``Engine.add_arrays`` (columns, no request objects) and the row store behind every add path."""

from __future__ import annotations

import random

import numpy as np
import pytest

from loragate.core.errors import InvalidRequestError
from loragate.twin.engine import Engine, EngineConfig, EngineRequest, RequestRecord
from loragate.twin.profile import load_profile
from loragate.twin.request_ids import NumberedIds

FAST = load_profile("fast")
CFG = EngineConfig(
    max_num_seqs=32,
    max_num_batched_tokens=512,
    max_model_len=2048,
    max_loras=3,
    max_cpu_loras=6,
    max_lora_rank=16,
    kv_capacity_tokens=16 * 400,
)
ADAPTERS: list[tuple[str | None, int]] = [(None, 0), *((f"a{i}", (8, 16)[i % 2]) for i in range(9))]


def columns(seed: int, n: int, *, shuffle: bool = False) -> dict[str, list[object]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(30.0)
        out.append((f"r{i}", round(t, 6), rng.randrange(len(ADAPTERS)), rng.randint(1, 400)))
    if shuffle:  # out-of-order arrivals (and some equal times) across and within calls
        rng.shuffle(out)
        out = [(i, round(a, 1), k, p) for i, a, k, p in out]
    return {
        "ids": [o[0] for o in out],
        "t": [o[1] for o in out],
        "ad": [o[2] for o in out],
        "p": [o[3] for o in out],
        "m": [1 + (o[3] * 7) % 300 for o in out],
    }


def as_requests(c: dict[str, list[object]], lo: int, hi: int) -> list[EngineRequest]:
    reqs = []
    for i in range(lo, hi):
        name, rank = ADAPTERS[int(c["ad"][i])]  # type: ignore[call-overload]
        reqs.append(
            EngineRequest(
                request_id=str(c["ids"][i]),
                adapter=name,
                adapter_rank=rank,
                prompt_tokens=int(c["p"][i]),  # type: ignore[call-overload]
                max_tokens=int(c["m"][i]),  # type: ignore[call-overload]
                arrival_s=float(c["t"][i]),  # type: ignore[arg-type]
            )
        )
    return reqs


def feed(mode: str, c: dict[str, list[object]], chunk: int, dt: float) -> list[RequestRecord]:
    e = Engine(CFG, FAST)
    recs: list[RequestRecord] = []
    n = len(c["ids"])
    t = 0.0
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        if mode in ("arrays", "numbered"):
            ids = [str(x) for x in c["ids"][lo:hi]]
            e.add_arrays(
                NumberedIds("r", 0, n)[lo:hi] if mode == "numbered" else ids,
                np.array(c["t"][lo:hi]),
                np.array(c["ad"][lo:hi]),
                c["p"][lo:hi],  # type: ignore[arg-type]
                np.array(c["m"][lo:hi]),
                adapters=ADAPTERS,
            )
        elif mode == "bulk":
            e.add_requests(as_requests(c, lo, hi))
        else:
            for r in as_requests(c, lo, hi):
                e.add_request(r)
        t += dt
        recs += e.run_until(t)
    recs += e.run_until(1e9)
    assert not e.has_unfinished()
    return recs


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("chunk", "dt"), [(50, 1.0), (7000, 0.5), (300, 3.0)])
def test_every_add_path_gives_the_same_records(shuffle: bool, chunk: int, dt: float) -> None:
    c = columns(3, 6000, shuffle=shuffle)  # > one 4096-row block, so rows span blocks
    recs = feed("arrays", c, chunk, dt)
    assert len(recs) == 6000
    assert recs == feed("bulk", c, chunk, dt)
    assert recs == feed("single", c, chunk, dt)
    if not shuffle:  # ids r0, r1, ... in row order: the same records with ids made when read
        assert c["ids"] == list(NumberedIds("r", 0, 6000))
        assert recs == feed("numbered", c, chunk, dt)


def test_numbered_ids_are_a_sequence_of_strings() -> None:
    ids = NumberedIds("req-", 5, 9)
    assert len(ids) == 4 and list(ids) == ["req-5", "req-6", "req-7", "req-8"]
    assert ids[0] == "req-5" and ids[-1] == "req-8" and "req-7" in ids
    assert list(ids[1:3]) == ["req-6", "req-7"] and list(ids[3:1]) == [] and len(ids[-2:]) == 2
    with pytest.raises(IndexError):
        ids[4]
    with pytest.raises(ValueError, match="contiguous"):
        ids[::2]
    assert len(NumberedIds("x", 3, 1)) == 0


def test_numbered_ids_are_made_for_admitted_and_aborted_rows_only() -> None:
    """Rows added with NumberedIds: admitted ones carry their ids; abort finds waiting and future
    ones by id, also across the 4096-row blocks."""
    e = Engine(EngineConfig(max_loras=1, max_num_seqs=2, max_num_batched_tokens=64), FAST)
    n = 5000
    e.add_arrays(
        NumberedIds("q", 100, 100 + n),
        [0.0] * 3 + [50.0] * (n - 3),
        [0, 1, 0] + [1] * (n - 3),
        [10] * n,
        [5] * n,
        adapters=[("a", 8), ("b", 8)],
    )
    e.step(0.0)  # q100 and q102 run (adapter a), q101 (adapter b) is deferred
    assert e.num_running == 2 and e.num_waiting == 1
    assert e.abort("q101") and e.abort("q4500") and e.abort("q5099")
    assert not e.abort("q4500") and not e.abort("q5100") and not e.abort("q99")
    recs = e.run_until(1e6)
    done = sorted(int(r.request_id[1:]) for r in recs)
    assert done == [100, 102, *(k for k in range(103, 100 + n) if k not in (4500, 5099))]
    assert not e.has_unfinished()


def test_blocks_of_admitted_rows_are_freed() -> None:
    c = columns(4, 9000)
    e = Engine(CFG, FAST)
    e.add_arrays(c["ids"], c["t"], c["ad"], c["p"], c["m"], adapters=ADAPTERS)  # type: ignore[arg-type]
    assert len(e._blocks) == 3
    e.run_until(1e9)
    assert not e.has_unfinished()
    assert list(e._blocks) == [2]  # the last block stays open for more rows


def test_abort_of_bulk_rows_waiting_or_still_in_the_future() -> None:
    e = Engine(EngineConfig(max_loras=1, max_num_seqs=2), FAST)
    e.add_arrays(
        ["w0", "w1", "w2", "f0", "f1"],
        [0.0, 0.0, 0.0, 50.0, 60.0],
        [0, 1, 0, 1, 0],
        [10] * 5,
        [5] * 5,
        adapters=[("a", 8), ("b", 8)],
    )
    e.step(0.0)  # w0 runs, w1 (other adapter) is deferred, w2 runs, f0/f1 are in the future
    assert e.num_running == 2 and e.num_waiting == 1
    assert e.abort("w1") and e.abort("f0") and not e.abort("f0") and not e.abort("zzz")
    assert e.num_waiting == 0
    with pytest.raises(InvalidRequestError, match="already in use"):
        e.add_request(
            EngineRequest(request_id="f1", adapter=None, prompt_tokens=1, max_tokens=1, arrival_s=0)
        )
    assert sorted(r.request_id for r in e.run_until(100.0)) == ["f1", "w0", "w2"]
    assert not e.has_unfinished() and e.next_step_start_s is None


def test_add_arrays_rejects_an_invalid_request_and_queues_nothing() -> None:
    e = Engine(EngineConfig(max_model_len=100, max_lora_rank=16), FAST)
    cols = (["ok", "bad"], [0.0, 1.0], [0, 1], [10, 10])
    with pytest.raises(InvalidRequestError, match="rank 32"):
        e.add_arrays(*cols, [5, 5], adapters=[("a", 8), ("b", 32)])
    with pytest.raises(InvalidRequestError, match="maximum context length is 100"):
        e.add_arrays(*cols, [5, 91], adapters=[("a", 8), ("b", 8)])
    assert not e.has_unfinished()
    with pytest.raises(ValueError, match="same length"):
        e.add_arrays(["x"], [0.0, 1.0], [0, 0], [1, 1], [1, 1], adapters=[("a", 8)])
    with pytest.raises(ValueError, match="out of range"):
        e.add_arrays(["x"], [0.0], [1], [1], [1], adapters=[("a", 8)])
    e.add_arrays(*cols, [5, 5], adapters=[("a", 8), ("b", 8)])
    assert [r.request_id for r in e.run_until(100.0)] == ["ok", "bad"]


def test_add_requests_queues_the_requests_before_an_invalid_one() -> None:
    e = Engine(EngineConfig(max_model_len=100), FAST)

    def r(rid: str, out: int) -> EngineRequest:
        return EngineRequest(
            request_id=rid, adapter=None, prompt_tokens=10, max_tokens=out, arrival_s=0
        )

    with pytest.raises(InvalidRequestError, match="too large"):
        e.add_requests([r("a", 5), r("b", 5), r("c", 95), r("d", 5)])
    assert sorted(x.request_id for x in e.run_until(100.0)) == ["a", "b"]


def test_add_arrays_reads_the_adapter_table_of_each_call() -> None:
    """The table's columns are cached between calls: a table changed in place must not reuse
    the previous call's adapters or ranks."""
    e = Engine(EngineConfig(max_lora_rank=16), FAST)
    table: list[tuple[str | None, int]] = [("a", 8), (None, 0)]
    e.add_arrays(["r0", "r1"], [0.0, 0.0], [0, 1], [10, 10], [5, 5], adapters=table)
    table[0] = ("b", 16)
    e.add_arrays(["r2"], [0.0], [0], [10], [5], adapters=table)
    table[0] = ("c", 32)
    with pytest.raises(InvalidRequestError, match="rank 32"):
        e.add_arrays(["r3"], [0.0], [0], [10], [5], adapters=table)
    recs = e.run_until(100.0)
    assert sorted((r.request_id, r.adapter) for r in recs) == [
        ("r0", "a"),
        ("r1", None),
        ("r2", "b"),
    ]
    assert not e.has_unfinished()
