"""Client traffic for the chaos tests, through the official ``openai`` SDK: a fixed, seeded mix
of completions and chats, streaming and not, over several adapters and the base model, with a
few bad requests; every request ends in exactly one :class:`Outcome`, read from what the
client saw (a stream's raw SSE lines, so that an error event and the ``[DONE]`` after it are
both checked)."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

# What the client saw. Only these count as an answer; anything else is a lost request.
OK = "ok"  # 200 with a finish reason (a stream: its chunks, a finish reason, [DONE])
STREAM_ABORT = "stream_abort"  # a stream the replica ended with finish_reason abort, [DONE]
STREAM_ERROR = "stream_error"  # a stream ended by an SSE error event, then [DONE]
ANSWERS = (OK, STREAM_ABORT, STREAM_ERROR)  # plus "http_<status>" in the OpenAI error shape

REPLICA_HEADER = "x-loragate-replica"

# Bad requests: (name, what to change in the request), each answered with a 4xx.
BAD_KINDS = ("unknown_model", "bad_n", "max_tokens_0")


@dataclass(frozen=True, slots=True)
class Spec:
    index: int
    instance: int  # which gateway instance it is sent to
    model: str
    chat: bool
    stream: bool
    max_tokens: int
    bad: str | None  # one of BAD_KINDS, or None


@dataclass(frozen=True, slots=True)
class Outcome:
    spec: Spec
    kind: str  # OK, STREAM_ABORT, STREAM_ERROR, "http_<status>", or what went wrong
    detail: str = ""
    replica: str = ""  # the X-Loragate-Replica header ("" without one)


class Progress:
    """How many requests have their outcome (the chaos script waits on it), and how many may
    start: with ``allowed`` set, request ``i`` waits until ``i < allowed`` (the script lets the
    traffic run only so far ahead of its next step; None: no limit)."""

    def __init__(self, *, allowed: int | None = None) -> None:
        self.done = 0
        self._allowed = allowed
        self._changed = asyncio.Condition()

    async def reached(self, n: int, *, timeout_s: float = 60.0) -> None:
        for _ in range(int(timeout_s / 0.01)):
            if self.done >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"traffic stalled: {self.done} of {n} requests done")

    async def allow(self, n: int | None) -> None:
        """Let the requests before ``n`` start (None: every request)."""
        async with self._changed:
            self._allowed = n
            self._changed.notify_all()

    async def may_start(self, index: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._allowed is None or index < self._allowed)


def plan(n: int, models: list[str], *, instances: int = 1, seed: int = 7) -> list[Spec]:
    """``n`` requests: half streamed, a third chats, spread over ``models``; every 40th bad."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        bad = BAD_KINDS[(i // 40) % len(BAD_KINDS)] if i % 40 == 17 else None
        model = "no-such-adapter" if bad == "unknown_model" else rng.choice(models)
        chat = rng.random() < 1 / 3 and bad != "max_tokens_0"
        stream = rng.random() < 0.5
        max_tokens = 0 if bad == "max_tokens_0" else rng.randint(8, 48)
        out.append(Spec(i, i % instances, model, chat, stream, max_tokens, bad))
    return out


def _args(spec: Spec) -> dict[str, Any]:
    args: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens}
    if spec.chat:
        args["messages"] = [{"role": "user", "content": f"request {spec.index}"}]
    else:
        args["prompt"] = f"request {spec.index}"
    if spec.bad == "bad_n":
        args["extra_body"] = {"n": "many"}  # vLLM's pydantic 400, from the replica
    return args


async def send(client: openai.AsyncOpenAI, spec: Spec, timeout_s: float) -> Outcome:
    """Send ``spec``; the outcome the client saw (``hang`` past ``timeout_s``)."""
    try:
        return await asyncio.wait_for(_send(client, spec), timeout_s)
    except TimeoutError:
        return Outcome(spec, "hang", f"no outcome within {timeout_s} s")


async def _send(client: openai.AsyncOpenAI, spec: Spec) -> Outcome:
    api: Any = client.chat.completions if spec.chat else client.completions
    try:
        if spec.stream:
            async with api.with_streaming_response.create(**_args(spec), stream=True) as resp:
                lines = [line async for line in resp.iter_lines()]
            kind, detail = _stream_outcome(lines)
            return Outcome(spec, kind, detail, resp.headers.get(REPLICA_HEADER, ""))
        raw = await api.with_raw_response.create(**_args(spec))
        answer = raw.parse()
        replica = raw.headers.get(REPLICA_HEADER, "")
        reason = answer.choices[0].finish_reason if answer.choices else None
        if reason in ("stop", "length"):
            return Outcome(spec, OK, "", replica)
        return Outcome(spec, f"finish_{reason}", answer.model_dump_json()[:300], replica)
    except openai.APIStatusError as exc:
        body = exc.body
        shaped = (
            isinstance(body, dict)
            and isinstance(body.get("message"), str)
            and isinstance(body.get("type"), str)
        )
        kind = f"http_{exc.status_code}" if shaped else f"unshaped_{exc.status_code}"
        replica = exc.response.headers.get(REPLICA_HEADER, "")
        return Outcome(spec, kind, json.dumps(body)[:300], replica)
    except openai.APITimeoutError as exc:
        return Outcome(spec, "client_timeout", repr(exc))
    except openai.APIConnectionError as exc:
        return Outcome(spec, "connection_error", repr(exc.__cause__ or exc))
    except httpx2.HTTPError as exc:  # a stream's body broken off under the SDK
        return Outcome(spec, "broken_stream", repr(exc))


def _stream_outcome(lines: list[str]) -> tuple[str, str]:
    """What a stream's SSE lines say: its kind, and a detail when it is no answer."""
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return "no_done", repr(lines[-3:])
    if "[DONE]" in events[:-1]:
        return "data_after_done", repr(lines[-3:])
    reasons: list[str] = []
    for raw in events[:-1]:
        data = json.loads(raw)
        if "error" in data:
            if raw is not events[-2]:
                return "events_after_error", repr(events[-3:])
            error = data["error"]
            if not (isinstance(error, dict) and isinstance(error.get("message"), str)):
                return "unshaped_error_event", raw[:300]
            return STREAM_ERROR, raw[:300]
        reasons += [c["finish_reason"] for c in data.get("choices", ()) if c.get("finish_reason")]
    if reasons == ["abort"]:
        return STREAM_ABORT, ""
    if len(reasons) == 1 and reasons[0] in ("stop", "length"):
        return OK, ""
    return "bad_finish", repr(events)[:400]


async def run_traffic(
    clients: list[openai.AsyncOpenAI],
    specs: list[Spec],
    *,
    concurrency: int,
    timeout_s: float,
    progress: Progress,
) -> list[Outcome]:
    """Send every spec (``concurrency`` at a time, in order, as far as ``progress`` allows) to
    its instance's client."""
    gate = asyncio.Semaphore(concurrency)

    async def one(spec: Spec) -> Outcome:
        await progress.may_start(spec.index)
        async with gate:
            outcome = await send(clients[spec.instance], spec, timeout_s)
        progress.done += 1
        return outcome

    return list(await asyncio.gather(*(one(s) for s in specs)))


def tally(outcomes: list[Outcome]) -> Counter[str]:
    return Counter(o.kind for o in outcomes)
