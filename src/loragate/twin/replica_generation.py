"""``/v1/completions`` and ``/v1/chat/completions`` of the simulated replica.

Each choice (prompt x ``n``) becomes one engine request whose ``max_tokens`` is the length of
its synthetic output plan; the engine decides *when* each token exists, the plan decides *what*
it says. Non-streaming answers when every choice has finished; streaming writes one SSE event
per engine token event, as vLLM does (one token per decode step). ``usage`` counts exactly the
tokens the engine emitted. A client that disconnects aborts its engine requests. A stream's
head goes out at once; a chat's role chunks wait for the request's first output (its first
token, or its abort), as vLLM writes them. ``logprobs`` are synthetic, in vLLM's shapes
(``synthetic_logprobs``).

``echo`` (see ``replica_protocol``): a choice's first text is prefixed with its prompt's
``echo_text`` (completions: in the choice's first token event, as vLLM does; chat: in one event
of its own after the role event). For ``echo`` with ``max_tokens: 0`` the engine still runs one
token, which counts in ``usage`` but whose text is not returned.

Stopping (``ReplicaState.stop_engine``) answers the requests in flight at once, as vLLM 0.32
does on SIGTERM with its default ``--shutdown-timeout 0`` (``EngineCore._handle_shutdown``
finishes every unfinished request as ``FINISHED_ABORTED``): a non-streaming request gets its
200 with the text so far, ``finish_reason: "abort"`` for each unfinished choice and the usage
so far; a stream gets a last chunk ``finish_reason: "abort"`` with empty text for each
unfinished choice that has sent text (vLLM sends no empty chunk for a choice without tokens,
but a completions echo not yet sent rides on it), then the usage chunk if asked and
``[DONE]``. An engine that fails (an exception in the driver) is vLLM's ``EngineDeadError``: a
500, or in a stream an error event, then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from loragate.core.log_fields import about_request
from loragate.twin.adapters import RegisteredAdapter
from loragate.twin.engine import EngineRequest, TokenEvent
from loragate.twin.realtime import EngineStoppedError
from loragate.twin.replica_protocol import (
    GenerationRequest,
    Kind,
    check_prompt_count,
    parse_generation_request,
    resolve_all_max_tokens,
)
from loragate.twin.replica_responses import (
    SSE_CONTENT_TYPE,
    SSE_DONE,
    ChoiceResult,
    TokenChunkEncoder,
    chat_body,
    chat_echo_chunk,
    chat_role_chunk,
    completion_body,
    completion_chunk,
    dumps,
    new_id,
    now_unix,
    running_usage,
    sse,
    usage_chunk,
    with_usage,
)
from loragate.twin.synthetic_logprobs import (
    chat_logprobs,
    completion_logprobs,
    output_logprob,
    prompt_logprobs_field,
)
from loragate.twin.synthetic_text import OutputPlan, OutputSampler
from loragate.twin.vllm_errors import (
    VllmApiError,
    check_json_media_type,
    model_not_found,
    parse_json_object,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterable

    from loragate.twin.server import ReplicaState


log = logging.getLogger(__name__)

# vLLM 0.32's EngineDeadError (``v1/engine/exceptions.py``), answered when the engine failed.
ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
ABORT = "abort"


def _engine_dead() -> VllmApiError:
    return VllmApiError(500, ENGINE_DEAD, "InternalServerError")


@dataclass(slots=True, kw_only=True)
class _Choice:
    index: int
    request_id: str
    plan: OutputPlan
    echo_text: str = ""  # put before the first generated text (completions)
    hide_output: bool = False  # echo without generation: the generated token is not shown
    stream: AsyncIterable[TokenEvent] | None = None
    emitted: int = 0
    finished: bool = False
    aborted: bool = False  # finished by an abort (the replica stopping, or the client gone)
    echo_sent: bool = False
    logprob_key: str = ""  # seeds the choice's synthetic logprobs
    text_offset: int = 0  # completions' logprobs: the text sent before the next token

    @property
    def finish_reason(self) -> str:
        return ABORT if self.aborted else self.plan.finish_reason

    def text_of(self, start: int, end: int) -> str:
        text = "" if self.hide_output else "".join(self.plan.token_texts[start:end])
        if start == 0 and self.echo_text:
            return self.echo_text + text
        return text


class Generator:
    """Runs generation requests against the replica's realtime engine."""

    def __init__(self, state: ReplicaState) -> None:
        self._state = state
        self._engine_ids = itertools.count()
        self._sampler = OutputSampler(
            seed=state.config.seed, mean_output_tokens=state.config.mean_output_tokens
        )

    async def resolve_model(self, name: str | None) -> tuple[str, RegisteredAdapter | None]:
        registry = self._state.registry
        base = self._state.config.base_model_name
        if name is None or name == base:
            return base, None
        adapter = registry.get(name)
        if adapter is None:
            adapter = registry.resolve(name)  # vLLM's filesystem resolver, if configured
            if adapter is None:
                raise model_not_found(name, base)
            await self._state.add_lora(adapter)
        return name, adapter

    async def handle(self, request: web.Request, kind: str) -> web.StreamResponse:
        gen_kind: Kind = "chat" if kind == "chat" else "completion"
        raw = await request.read()
        check_json_media_type(request.headers.get(hdrs.CONTENT_TYPE, ""), raw)
        if not self._state.accepting and self._state.phase == "serving":  # stop_engine alone
            raise VllmApiError(503, "The replica is shutting down.", "ServiceUnavailableError")
        body = parse_json_object(raw)
        gen = parse_generation_request(gen_kind, body, self._state.config.prompt_format)
        model, adapter = await self.resolve_model(gen.model)
        self._state.refuse_while_stopping()  # after the model check, as vLLM's preflight
        choices = self._plan(gen, model)
        request_id = new_id(gen_kind, request.headers.get("X-Request-Id"))
        prompt_tokens = sum(p.prompt_tokens for p in gen.prompts)
        try:
            self._submit(gen, choices, request_id, adapter)
            if gen.stream:
                return await self._stream(request, gen, choices, request_id, model, prompt_tokens)
            try:
                await asyncio.gather(*(self._drain(c) for c in choices))
            except EngineStoppedError as exc:  # the engine failed
                raise _engine_dead() from exc
        finally:
            self._abort_unfinished(choices)  # stopped: answered with what they have
        results = [
            ChoiceResult(
                index=c.index,
                text=c.text_of(0, c.emitted)
                if gen_kind == "completion"
                else self._chat_text(gen, c),
                finish_reason=c.finish_reason,
                completion_tokens=c.emitted,
                logprobs=self._logprobs(gen, c, 0, c.emitted, with_prompt=True),
                prompt_logprobs=self._prompt_logprobs(gen, c),
            )
            for c in choices
        ]
        if gen_kind == "chat":
            payload = chat_body(
                request_id=request_id,
                created=now_unix(),
                model=model,
                choices=results,
                prompt_tokens=prompt_tokens,
                role=gen.role,
                prompt_logprobs=gen.prompts[0].prompt_logprobs(gen.prompt_logprobs)
                if gen.prompt_logprobs is not None
                else None,
            )
        else:
            payload = completion_body(
                request_id=request_id,
                created=now_unix(),
                model=model,
                choices=results,
                prompt_tokens=prompt_tokens,
            )
        return web.Response(body=dumps(payload), content_type="application/json")

    @staticmethod
    def _prompt_logprobs(gen: GenerationRequest, c: _Choice) -> list[Any] | None:
        """A completion choice's ``prompt_logprobs`` when asked for (the field, or ``echo``
        with ``logprobs``): the prompt's tokens as an echo's ``logprobs`` list them (ids to
        ``{logprob, rank, decoded_token}``)."""
        if gen.kind != "completion" or gen.prompt_logprobs is None:
            return None
        spec = gen.prompts[c.index // gen.n]
        entries = spec.logprob_entries(gen.prompt_logprobs, spec.token_texts())
        return prompt_logprobs_field(entries, spec.ids())

    @staticmethod
    def _chat_text(gen: GenerationRequest, c: _Choice) -> str:
        echo = gen.prompts[c.index // gen.n].echo_text if gen.echo else ""
        if c.aborted:
            return echo + "".join(c.plan.token_texts[: c.emitted])
        return echo + c.plan.text

    def _plan(self, gen: GenerationRequest, model: str) -> list[_Choice]:
        max_len = self._state.config.max_model_len
        choices: list[_Choice] = []
        check_prompt_count(gen)
        max_tokens_of = resolve_all_max_tokens(gen, max_len)  # 1 for an echo only
        for p_index, spec in enumerate(gen.prompts):
            max_tokens = max_tokens_of[p_index]
            for j in range(gen.n):
                plan = self._sampler.plan(
                    model=model,
                    prompt_key=f"{spec.key}#{j}" if j else spec.key,
                    max_tokens=max_tokens,
                    ignore_eos=gen.ignore_eos,
                    min_tokens=min(gen.min_tokens, max_tokens),
                    greedy=gen.greedy,
                    request_seed=gen.seed,
                )
                choices.append(
                    _Choice(
                        index=p_index * gen.n + j,
                        request_id="",
                        plan=plan,
                        echo_text=spec.echo_text if gen.echo and gen.kind == "completion" else "",
                        hide_output=gen.echo_only,
                        logprob_key=f"{model}|{spec.key}#{j}",
                    )
                )
        return choices

    def _submit(
        self,
        gen: GenerationRequest,
        choices: list[_Choice],
        request_id: str,
        adapter: RegisteredAdapter | None,
    ) -> None:
        state = self._state
        for c in choices:
            spec = gen.prompts[c.index // gen.n]
            # Engine ids stay unique even when clients reuse an X-Request-Id.
            c.request_id = f"{request_id}-{c.index}-{next(self._engine_ids)}"
            c.stream = state.realtime.submit(
                EngineRequest(
                    request_id=c.request_id,
                    adapter=adapter.name if adapter is not None else None,
                    adapter_rank=adapter.rank if adapter is not None else 0,
                    prompt_tokens=spec.prompt_tokens,
                    max_tokens=c.plan.num_tokens,
                    arrival_s=state.realtime.now_s(),
                )
            )
            state.counters.prompt_tokens_total += spec.prompt_tokens

    def _advance(self, c: _Choice, event: TokenEvent) -> tuple[str, str | None, int, int]:
        """Count ``event``'s tokens for ``c``: (their text, the finish reason if the last,
        the first's and one past the last's positions)."""
        state = self._state
        start = c.emitted
        c.emitted += event.n_tokens
        state.counters.generation_tokens_total += event.n_tokens
        state.observe_step()
        finish: str | None = None
        if event.finished:
            c.finished = True
            finish = c.plan.finish_reason
            state.counters.finished(finish)
        return c.text_of(start, c.emitted), finish, start, c.emitted

    async def _drain(self, c: _Choice) -> None:
        assert c.stream is not None
        async for event in c.stream:
            self._advance(c, event)

    async def _events(
        self, choices: list[_Choice]
    ) -> AsyncIterator[tuple[_Choice, str, str | None, int, int]]:
        if len(choices) == 1:
            c = choices[0]
            assert c.stream is not None
            async for event in c.stream:
                yield c, *self._advance(c, event)
            return
        queue: asyncio.Queue[
            tuple[_Choice, str, str | None, int, int] | EngineStoppedError | None
        ] = asyncio.Queue()

        async def pump(c: _Choice) -> None:
            try:
                assert c.stream is not None
                async for event in c.stream:
                    await queue.put((c, *self._advance(c, event)))
            except EngineStoppedError as exc:  # the engine failed: the stream's error event
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, EngineStoppedError):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(
        self,
        request: web.Request,
        gen: GenerationRequest,
        choices: list[_Choice],
        request_id: str,
        model: str,
        prompt_tokens: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
        created = now_unix()
        encoder = TokenChunkEncoder(
            kind=gen.kind, request_id=request_id, created=created, model=model
        )
        usage_of = self._usage_of(gen)
        head = (request_id, created, model)
        opened = gen.kind != "chat"  # a chat stream opens with its role chunks
        try:
            # Inside the ``try``: a client may be gone before the head goes out (its request
            # waited in the socket while the replica was paused, e.g. SIGSTOP).
            await response.prepare(request)
            # A choice's terminal chunk carries the fingerprint unless a usage chunk follows.
            fingerprint = not gen.include_usage
            echo_ids = gen.echo and gen.kind == "completion"
            async for c, text, finish, start, end in self._events(choices):
                logprobs = self._logprobs(gen, c, start, end, with_prompt=not c.echo_sent)
                if not opened:
                    opened = True
                    await self._write_chat_head(response, gen, choices, head)
                if echo_ids and not c.echo_sent:
                    # The echoing chunk also returns the prompt's token ids.
                    c.echo_sent = True
                    chunk = completion_chunk(
                        request_id=request_id,
                        created=created,
                        model=model,
                        index=c.index,
                        text=text,
                        finish_reason=finish,
                        prompt_token_ids=gen.prompts[c.index // gen.n].ids(),
                        fingerprint=fingerprint and finish is not None,
                        logprobs=logprobs,
                    )
                    await response.write(sse(with_usage(chunk, usage_of(c))))
                elif finish is None:
                    await response.write(encoder.token(c.index, text, usage_of(c), logprobs))
                else:
                    await response.write(
                        encoder.final(
                            c.index,
                            text,
                            finish,
                            fingerprint=fingerprint,
                            usage=usage_of(c),
                            logprobs=logprobs,
                        )
                    )
            if not opened:  # stopped before any token: the aborts are the first output
                await self._write_chat_head(response, gen, choices, head)
            for c in choices:  # unfinished: the replica stopped, as vLLM aborts them
                if not c.finished:
                    await self._write_abort(response, gen, c, encoder, head, fingerprint)
            if gen.include_usage:
                usage = usage_chunk(
                    kind=gen.kind,
                    request_id=request_id,
                    created=created,
                    model=model,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=sum(c.emitted for c in choices),
                )
                await response.write(sse(usage))
            await response.write(SSE_DONE)
            await response.write_eof()
        except ConnectionResetError:
            # The client went away: normal, not an error (vLLM aborts the request and says so
            # only with --enable-log-requests, at INFO). The caller's ``finally`` aborts the
            # engine requests, which frees their slots and counts them as aborted.
            log.debug(
                "request %s aborted: the client closed the stream",
                request_id,
                extra=about_request(request_id),
            )
        except EngineStoppedError:
            # The engine failed. Headers are sent: report in-band as vLLM does, then end.
            with contextlib.suppress(ConnectionResetError):
                await response.write(b"data: " + _engine_dead().event_body() + b"\n\n" + SSE_DONE)
                await response.write_eof()
        return response

    async def _write_chat_head(
        self,
        response: web.StreamResponse,
        gen: GenerationRequest,
        choices: list[_Choice],
        head: tuple[str, int, str],
    ) -> None:
        """A chat stream's role chunk for every choice, then the echo of the last message.

        vLLM 0.32 writes them with the request's first output from the engine (its first token,
        or its abort when stopped), not when the stream opens (``chat_completion/serving.py``,
        ``first_iteration``): until then the client has the response head and nothing else, so
        a client timing its first chunk measures the queue and the prefill. Their running
        usage (``continuous_usage_stats``) counts no completion token yet."""
        request_id, created, model = head
        zero = self._zero_usage(gen)
        for c in choices:
            role = chat_role_chunk(
                request_id=request_id, created=created, model=model, index=c.index, role=gen.role
            )
            await response.write(sse(with_usage(role, zero(c))))
        for c in choices:
            echo = gen.prompts[c.index // gen.n].echo_text if gen.echo else ""
            if echo:
                chunk = chat_echo_chunk(
                    request_id=request_id, created=created, model=model, index=c.index, text=echo
                )
                await response.write(sse(with_usage(chunk, zero(c))))

    async def _write_abort(
        self,
        response: web.StreamResponse,
        gen: GenerationRequest,
        c: _Choice,
        encoder: TokenChunkEncoder,
        head: tuple[str, int, str],
        fingerprint: bool,
    ) -> None:
        """A choice's last chunk when the replica stopped under it (vLLM: the aborted
        request's final output, empty text, ``finish_reason: "abort"``)."""
        c.aborted = True
        usage = self._usage_of(gen)(c)
        # No new token: the logprobs of none (a completions echo: the prompt's).
        logprobs = self._logprobs(gen, c, c.emitted, c.emitted, with_prompt=not c.echo_sent)
        if gen.echo and gen.kind == "completion" and not c.echo_sent:
            c.echo_sent = True  # the echo rides on the choice's first chunk, this one
            request_id, created, model = head
            chunk = completion_chunk(
                request_id=request_id,
                created=created,
                model=model,
                index=c.index,
                text=c.echo_text,
                finish_reason=ABORT,
                prompt_token_ids=gen.prompts[c.index // gen.n].ids(),
                fingerprint=fingerprint,
                logprobs=logprobs,
            )
            await response.write(sse(with_usage(chunk, usage)))
        elif c.emitted:  # vLLM sends no empty chunk for a choice without a token yet
            await response.write(
                encoder.final(
                    c.index, "", ABORT, fingerprint=fingerprint, usage=usage, logprobs=logprobs
                )
            )

    @staticmethod
    def _usage_of(gen: GenerationRequest) -> Callable[[_Choice], dict[str, Any] | None]:
        """A choice's running usage for each chunk (``continuous_usage_stats``), else None."""
        if not gen.continuous_usage:
            return lambda c: None

        def usage(c: _Choice) -> dict[str, Any]:
            prompt_tokens = gen.prompts[c.index // gen.n].prompt_tokens
            return running_usage(gen.kind, prompt_tokens, c.emitted)

        return usage

    @staticmethod
    def _logprobs(
        gen: GenerationRequest, c: _Choice, start: int, end: int, *, with_prompt: bool
    ) -> dict[str, Any] | None:
        """The ``logprobs`` of ``c``'s tokens ``start:end`` (None unless asked for); a
        completions echo (``with_prompt``, its first chunk) lists the prompt's tokens first.
        Completions' ``text_offset`` runs on from the choice's text sent so far."""
        count = gen.logprobs
        if count is None:
            return None
        alternatives = max(count - 1, 0)  # the token ranks first among the ``count`` listed
        tokens = c.plan.token_texts
        out = [] if c.hide_output else [
            output_logprob(c.logprob_key, i, tokens[i], alternatives) for i in range(start, end)
        ]  # fmt: skip
        if gen.kind == "chat":
            return chat_logprobs(out, count)
        if with_prompt and gen.echo:
            spec = gen.prompts[c.index // gen.n]
            out = spec.logprob_entries(count, spec.token_texts()) + out
        logprobs = completion_logprobs(out, c.text_offset)
        c.text_offset += sum(len(e.token) for e in out)
        return logprobs

    @staticmethod
    def _zero_usage(gen: GenerationRequest) -> Callable[[_Choice], dict[str, Any] | None]:
        """A choice's running usage before its first token (``continuous_usage_stats``)."""
        if not gen.continuous_usage:
            return lambda c: None
        return lambda c: running_usage(gen.kind, gen.prompts[c.index // gen.n].prompt_tokens, 0)

    def _abort_unfinished(self, choices: list[_Choice]) -> None:
        for c in choices:
            if c.stream is not None and not c.finished:
                c.finished = c.aborted = True
                self._state.realtime.abort(c.request_id)
                self._state.counters.finished("abort")
