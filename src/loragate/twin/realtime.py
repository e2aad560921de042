"""Drive a twin :class:`~loragate.twin.engine.Engine` in wall-clock time (asyncio).

One background task steps the engine while there is work: it computes a step, sleeps until that
step's end and then hands each request its token events. Sleeps aim at absolute deadlines on the
clock and busy steps start back to back in engine time (``step(time_s)``), so wake-up latency
does not accumulate: the total wall time of a busy period is the sum of its step times (divided
by ``time_scale``). When idle the task waits for a submission. Requests submitted during a step
join the next one, as in vLLM.

Engine time and wall time are tied by ``engine_s = e0 + (clock.now() - c0) · time_scale``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from loragate.core.clock import Clock, WallClock
from loragate.core.tasks import cancel_and_wait
from loragate.twin.engine import Engine, EngineRequest, TokenEvent

log = logging.getLogger(__name__)

_MAX_LAG_S = 1.0  # engine seconds behind the wall clock before the schedule is re-anchored


class EngineStoppedError(RuntimeError):
    """The realtime driver stopped (or failed) before the request finished."""


class TokenStream:
    """Async iterator over one request's :class:`TokenEvent`; ends after the finished event."""

    __slots__ = ("_done", "_owner", "_queue", "request_id")

    def __init__(self, request_id: str, owner: RealtimeEngine) -> None:
        self.request_id = request_id
        self._owner = owner
        self._queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self._done = False

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            if isinstance(item, StopAsyncIteration):
                raise StopAsyncIteration
            raise EngineStoppedError(str(item)) from item
        if item.finished:
            self._done = True
        return item

    def _push(self, item: TokenEvent | BaseException) -> None:
        self._queue.put_nowait(item)

    async def aclose(self) -> None:
        """The consumer goes away: abort the request in the engine."""
        if not self._done:
            self._owner.abort(self.request_id)
            self._done = True


class RealtimeEngine:
    def __init__(
        self, engine: Engine, clock: Clock | None = None, *, time_scale: float = 1.0
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0 (got {time_scale})")
        self.engine = engine
        self.clock: Clock = clock if clock is not None else WallClock()
        self.time_scale = time_scale
        self._c0 = self.clock.now()
        self._e0 = engine.time_s
        self._streams: dict[str, TokenStream] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while no stream is open
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.busy_engine_s = 0.0  # sum of step durations run so far

    def now_s(self) -> float:
        """The current time on the engine's time axis."""
        return self._e0 + (self.clock.now() - self._c0) * self.time_scale

    def _wall_at(self, engine_s: float) -> float:
        return self._c0 + (engine_s - self._e0) / self.time_scale

    async def start(self) -> None:
        if self._task is not None:
            return
        self._c0 = self.clock.now()
        self._e0 = max(self.engine.time_s, self._e0)
        self._task = asyncio.create_task(self._run(), name="twin-realtime-engine")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        self._fail_all(StopAsyncIteration())

    async def kill(self) -> None:
        """The engine dies under its requests (vLLM's EngineCore killed when its
        ``--shutdown-timeout`` ends): each open stream raises :class:`EngineStoppedError`."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        self._fail_all(RuntimeError("the engine was killed"))

    async def idle(self) -> None:
        """Until no request's consumer waits for its last event."""
        await self._idle.wait()

    def _forget_done(self) -> None:
        if not self._streams:
            self._idle.set()

    def submit(self, req: EngineRequest) -> TokenStream:
        """Queue ``req`` (validated by the engine; raises its errors) and return its stream."""
        self.engine.add_request(req)
        stream = TokenStream(req.request_id, self)
        self._streams[req.request_id] = stream
        self._idle.clear()
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._done = True
            self._forget_done()
        return self.engine.abort(request_id)

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        self._idle.set()
        for stream in streams.values():
            stream._push(exc)

    def _deliver(self, events: list[TokenEvent]) -> None:
        streams = self._streams
        for ev in events:
            stream = streams.get(ev.request_id)
            if stream is None:
                continue
            stream._push(ev)
            if ev.finished:
                del streams[ev.request_id]
                self._forget_done()

    async def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                nxt = engine.next_step_start_s
                if nxt is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                now = self.now_s()
                if nxt > now:  # only future arrivals: wait for them or a new submission
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), (nxt - now) / self.time_scale)
                    continue
                # Busy: start back to back with the previous step unless far behind.
                start = nxt if now - nxt < _MAX_LAG_S else now
                res = engine.step(start)
                if res.duration_s <= 0.0:
                    await asyncio.sleep(0)
                    continue
                self.steps += 1
                self.busy_engine_s += res.duration_s
                delay = self._wall_at(res.start_s + res.duration_s) - self.clock.now()
                await asyncio.sleep(max(0.0, delay))
                self._deliver(res.events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("twin engine failed")
            self._fail_all(exc)
            raise
