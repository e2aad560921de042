"""The engine's waiting queues under every way of feeding it (white-box invariants).

Each adapter keeps its never-admitted rows, waiting or still to arrive, in a stream; the engine
records each queue's head and, for an empty queue, the row to wake when it arrives ("sleeper").
Random scenarios mix bulk and single adds, arrivals out of order or already due, aborts of
waiting, future and sleeping rows, adapter loads and preemptions (requeued requests in front of
a stream), and after every call the recorded heads, sleepers and waiting counts must match what
the queues hold. Every request must finish with its exact output length, and stepping the engine
one step at a time must give the records that ``run_until`` gives.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from loragate.twin.engine import Engine, EngineConfig, EngineRequest, RequestRecord
from loragate.twin.profile import load_profile
from loragate.twin.request_ids import NumberedIds

FAST = load_profile("fast")


def check_queues(e: Engine) -> None:
    waiting = 0
    for ast in e._alist:
        st = ast.stream
        rows = list(st[ast.ri :])
        orders = [e._wseq(g) for g in rows]
        assert orders == sorted(orders), "a stream out of waiting order"
        arrived = [g for g in rows if e._row_ns(g) <= e._t_check]
        assert rows[: len(arrived)] == arrived, "a row still to arrive before one that arrived"
        head = ast.front[0] if ast.front else (arrived[0] if arrived else None)
        assert ast.head == head
        if head is None and rows:
            assert ast.sleeper == rows[0], "an empty queue with rows to come must sleep on one"
        if head is not None:
            assert ast.sleeper == -1
        waiting += len(ast.front) + len(arrived)
        assert e._waiting(ast) == len(ast.front) + len(arrived)
    assert waiting == e.num_waiting
    assert 0 <= e.num_deferred <= e.num_waiting


def scenario(seed: int, *, stepped: bool, check: bool) -> tuple[list[str], list[RequestRecord]]:
    rng = random.Random(seed)
    cfg = EngineConfig(
        max_num_seqs=rng.choice([4, 16, 64]),
        max_num_batched_tokens=rng.choice([256, 1024]),
        max_model_len=1024,
        max_loras=rng.choice([1, 2, 3]),
        max_cpu_loras=rng.choice([3, 8]),
        max_lora_rank=32,
        kv_capacity_tokens=16 * rng.choice([80, 300, 2000]),  # the smallest: many preemptions
    )
    e = Engine(cfg, FAST)
    adapters = [(None, 0), *((f"a{k}", (8, 16, 32)[k % 3]) for k in range(1, rng.choice([3, 9])))]
    arrays = np.random.default_rng(seed)
    events: list[str] = []
    done: list[RequestRecord] = []
    ids: list[str] = []
    clock = 0.0
    while clock < 8.0:
        dt = rng.choice([0.05, 0.4])
        # Arrivals up to 3 s ahead of the clock, now and then some out of order or already due.
        n = int(arrays.poisson(rng.choice([5.0, 60.0]) * dt))
        arr = sorted(clock + rng.random() * 3.0 for _ in range(n))
        if arr and rng.random() < 0.3:
            rng.shuffle(arr)
            arr[0] = max(0.0, clock - rng.random())
        rows = [
            (round(a, 4), rng.randrange(len(adapters)), rng.randint(1, 300), rng.randint(1, 200))
            for a in arr
        ]
        first = len(ids)
        ids += [f"r{first + k}" for k in range(len(rows))]
        how = rng.choice(["arrays", "requests", "request"])
        if how == "arrays" and rows:
            cols = list(zip(*rows, strict=True))
            e.add_arrays(
                NumberedIds("r", first, first + len(rows)),
                np.array(cols[0]),
                np.array(cols[1]),
                np.array(cols[2]),
                np.array(cols[3]),
                adapters=adapters,
            )
        else:
            reqs = [
                EngineRequest(
                    request_id=f"r{first + k}",
                    adapter=adapters[a][0],
                    adapter_rank=adapters[a][1],
                    prompt_tokens=p,
                    max_tokens=m,
                    arrival_s=t,
                )
                for k, (t, a, p, m) in enumerate(rows)
            ]
            if how == "requests":
                e.add_requests(reqs)
            else:
                for r in reqs:
                    e.add_request(r)
        if check:
            check_queues(e)
        for _ in range(rng.choice([0, 0, 1, 3])):  # aborts: running, waiting, future or gone
            rid = rng.choice(ids) if ids else "none"
            events.append(f"abort {rid} {e.abort(rid)}")
            if check:
                check_queues(e)
        if rng.random() < 0.1:
            name, rank = adapters[rng.randrange(1, len(adapters))]
            e.load_adapter(name, rank, to_gpu=rng.random() < 0.5)
        clock += dt
        if stepped:
            while (start := e.next_step_start_s) is not None and start < clock:
                done += e.step(start).finished
                if check:
                    check_queues(e)
        else:
            done += e.run_until(clock)
            if check:
                check_queues(e)
    done += e.run_until(1e6)
    assert not e.has_unfinished() and e.num_waiting == 0 and e.num_running == 0
    return events, done


@pytest.mark.parametrize("seed", range(24))
def test_queue_heads_sleepers_and_counts_hold_after_every_call(seed: int) -> None:
    events, done = scenario(seed, stepped=seed % 2 == 0, check=True)
    aborted = {line.split()[1] for line in events if line.endswith("True")}
    assert {r.request_id for r in done}.isdisjoint(aborted)


@pytest.mark.parametrize("seed", range(24, 36))
def test_stepping_and_run_until_give_the_same_records(seed: int) -> None:
    by_steps: Any = scenario(seed, stepped=True, check=False)
    by_runs: Any = scenario(seed, stepped=False, check=False)
    assert by_steps == by_runs
    assert len(by_runs[1]) > 0


def test_an_aborted_sleeper_is_not_woken() -> None:
    e = Engine(EngineConfig(max_loras=1, max_cpu_loras=2), FAST)
    e.add_request(
        EngineRequest(
            request_id="late",
            adapter="a",
            adapter_rank=8,
            prompt_tokens=8,
            max_tokens=4,
            arrival_s=5.0,
        )
    )
    check_queues(e)  # the adapter's queue is empty: it sleeps on "late"
    assert e.abort("late")
    check_queues(e)
    assert e.run_until(10.0) == [] and not e.has_unfinished()
    e.add_request(
        EngineRequest(
            request_id="next",
            adapter="a",
            adapter_rank=8,
            prompt_tokens=8,
            max_tokens=4,
            arrival_s=11.0,
        )
    )
    assert [r.request_id for r in e.run_until(20.0)] == ["next"]
