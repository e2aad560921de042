"""HTTP client for one vLLM 0.32 replica: admin calls, model list, metrics, health.

The client does not own its ``aiohttp.ClientSession``: one session per gateway app is shared by
every replica for polling and admin calls. The proxy hot path (``loragate.gateway.proxy``) uses
:attr:`VllmClient.upstream`, a lean keep-alive HTTP/1.1 client (``backends.upstream``).
Everything here maps aiohttp errors onto ``loragate.core.errors`` at the boundary.

Admin success bodies are plain strings, not JSON (VLLM_API.md §4.2), so results are decided by
status code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from loragate.backends.metrics import VllmMetrics, parse_vllm_metrics
from loragate.backends.upstream import UpstreamPool
from loragate.core.errors import (
    AdapterLoadError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)

_ALREADY_LOADED = "has already been loaded"
REQUEST_ID_HEADER = "X-Request-Id"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCard:
    """One entry of ``GET /v1/models``. ``parent`` is set for adapters (the base model's id);
    ``root`` is the path the model or adapter was loaded from; ``max_model_len`` is the base
    model's context length (vLLM gives None for adapters)."""

    id: str
    parent: str | None
    root: str | None = None
    max_model_len: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelList:
    cards: tuple[ModelCard, ...]

    @property
    def base_models(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.cards if c.parent is None)

    @property
    def adapters(self) -> frozenset[str]:
        return frozenset(c.id for c in self.cards if c.parent is not None)


def parse_models(payload: object) -> ModelList:
    """Parse the JSON of ``GET /v1/models`` (OpenAI list shape)."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("data"), list):
        raise UpstreamProtocolError("/v1/models: expected {'object': 'list', 'data': [...]}")
    cards: list[ModelCard] = []
    for entry in payload["data"]:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
            raise UpstreamProtocolError(f"/v1/models: bad model card {entry!r:.200}")
        parent = entry.get("parent")
        root = entry.get("root")
        max_len = entry.get("max_model_len")
        cards.append(
            ModelCard(
                id=entry["id"],
                parent=parent if isinstance(parent, str) else None,
                root=root if isinstance(root, str) else None,
                max_model_len=(
                    max_len if isinstance(max_len, int) and not isinstance(max_len, bool) else None
                ),
            )
        )
    return ModelList(cards=tuple(cards))


def error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, else the body text (truncated)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", "replace").strip()
    if isinstance(payload, Mapping):
        err = payload.get("error")
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return str(err["message"])
    return body[:500].decode("utf-8", "replace").strip()


def map_client_error(exc: BaseException, what: str) -> UpstreamError:
    """Map an aiohttp / timeout exception onto the loragate error tree."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # could not even connect: retryable
        return UpstreamConnectError(f"{what}: connect timed out")
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeoutError(f"{what}: timed out")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamProtocolError(f"{what}: {exc.status} {exc.message}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamConnectError(f"{what}: response broken off ({exc})")
    return UpstreamConnectError(f"{what}: {type(exc).__name__}: {exc}")


class VllmClient:
    """Talks to one replica at ``base_url`` (no trailing slash)."""

    __slots__ = (
        "admin_timeout",
        "base_url",
        "headers",
        "json_headers",
        "poll_timeout",
        "session",
        "upstream",
    )

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        api_key: str | None = None,
        poll_timeout_s: float = 2.0,
        admin_timeout_s: float = 60.0,
        connect_timeout_s: float = 3.0,
        max_idle_connections: int = 256,
    ) -> None:
        self.session = session
        # The proxy hot path's lean keep-alive client (completions and chat completions).
        self.upstream = UpstreamPool(
            base_url,
            api_key=api_key,
            connect_timeout_s=connect_timeout_s,
            max_idle=max_idle_connections,
        )
        self.base_url = base_url.rstrip("/")
        self.headers: Mapping[str, str] = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.json_headers: Mapping[str, str] = {**self.headers, "Content-Type": "application/json"}
        self.poll_timeout = aiohttp.ClientTimeout(total=poll_timeout_s)
        self.admin_timeout = aiohttp.ClientTimeout(total=admin_timeout_s)

    def __repr__(self) -> str:
        return f"VllmClient({self.base_url!r})"

    async def _get(self, path: str) -> tuple[int, bytes]:
        try:
            async with self.session.get(
                self.base_url + path, headers=self.headers, timeout=self.poll_timeout
            ) as resp:
                return resp.status, await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_error(exc, f"GET {self.base_url}{path}") from exc

    async def _post_json(
        self, path: str, payload: Mapping[str, Any], request_id: str | None = None
    ) -> tuple[int, bytes]:
        headers = self.json_headers
        if request_id is not None:
            headers = {**headers, REQUEST_ID_HEADER: request_id}
        try:
            async with self.session.post(
                self.base_url + path,
                data=json.dumps(payload).encode(),
                headers=headers,
                timeout=self.admin_timeout,
            ) as resp:
                return resp.status, await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_error(exc, f"POST {self.base_url}{path}") from exc

    def _status_error(self, path: str, status: int, detail: str = "") -> UpstreamProtocolError:
        """A polled endpoint answered ``status``, not 200; the message names the whole URL."""
        message = f"GET {self.base_url}{path}: status {status}"
        if detail:
            message += f": {detail}"
        if status == 404 and self.base_url.endswith("/v1"):  # the OpenAI base_url habit
            message += " (a replica's url is the server's root, without /v1)"
        return UpstreamProtocolError(message)

    async def health(self) -> bool:
        """True when ``GET /health`` answers 200. Connection failures raise ``UpstreamError``."""
        status, _ = await self._get("/health")
        return status == 200

    async def check_health(self) -> None:
        """Raise ``UpstreamError`` unless ``GET /health`` answers 200."""
        status, _ = await self._get("/health")
        if status != 200:
            raise self._status_error("/health", status)

    async def list_models(self) -> ModelList:
        status, body = await self._get("/v1/models")
        if status != 200:
            raise self._status_error("/v1/models", status, error_message(body))
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise UpstreamProtocolError("GET /v1/models: body is not JSON") from exc
        return parse_models(payload)

    async def version(self) -> tuple[int, bytes]:
        """``GET /version``: (status, body). Connection failures raise ``UpstreamError``."""
        return await self._get("/version")

    async def metrics(self) -> VllmMetrics:
        status, body = await self._get("/metrics")
        if status != 200:
            raise self._status_error("/metrics", status)
        return parse_vllm_metrics(body.decode("utf-8", "replace"))

    async def load_adapter(
        self, name: str, path: str, *, load_inplace: bool = False, request_id: str | None = None
    ) -> bool:
        """Register adapter ``name`` from ``path``. Returns False if it was already registered
        (vLLM's 400 "has already been loaded" is treated as success: the call is idempotent),
        which says nothing of the path it was registered from: the caller compares its
        ``/v1/models`` card's ``root`` (``ReplicaPool`` does). ``load_inplace``: replace a
        registered adapter of that name (vLLM reads the folder again; 200 either way).
        ``request_id``: sent as ``X-Request-Id`` (vLLM 0.32 ignores it there; proxies in front
        of it may log it)."""
        payload: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if load_inplace:
            payload["load_inplace"] = True
        status, body = await self._post_json("/v1/load_lora_adapter", payload, request_id)
        if status == 200:
            return True
        message = error_message(body)
        if status == 400 and _ALREADY_LOADED in message:
            return False
        # No URL in the message: the gateway's clients see it (the pool logs the URL).
        raise AdapterLoadError(
            f"loading adapter {name!r} failed ({status}): {message}", status=status
        )

    async def unload_adapter(self, name: str, *, request_id: str | None = None) -> bool:
        """Unregister ``name``. Returns False if the replica did not know it (404).
        ``request_id``: sent as ``X-Request-Id``."""
        status, body = await self._post_json(
            "/v1/unload_lora_adapter", {"lora_name": name}, request_id
        )
        if status == 200:
            return True
        if status == 404:
            return False
        raise AdapterLoadError(
            f"unloading adapter {name!r} failed ({status}): {error_message(body)}", status=status
        )
