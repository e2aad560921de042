"""What a target serves (``GET /v1/models``) and which of its models a workload's adapters use.

A workload spec names its own adapters (``adapter-000``, ``client-3``...), which a real fleet
rarely has. vLLM and the gateway list LoRA adapters in ``/v1/models`` as cards with a
``parent`` (the base model); :func:`map_adapters` assigns them to the spec's adapters in
popularity order, the spec's busiest adapter to the first one listed, cycling when the fleet
has fewer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from loragate.core.errors import LoragateError
from loragate.loadtest.answers import error_message


class TargetError(LoragateError):
    """The target cannot be used: unreachable (``reachable`` False), refused the API key, or
    not an OpenAI server."""

    def __init__(self, message: str, *, reachable: bool = True) -> None:
        super().__init__(message)
        self.reachable = reachable


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetModels:
    """The models one ``GET /v1/models`` listed: the base model and the LoRA adapters."""

    base_model: str | None
    adapters: tuple[str, ...]
    others: tuple[str, ...] = ()  # further models without a parent (a second base)


def openai_base(url: str) -> str:
    """``http://host:port``, ``.../`` or ``.../v1`` -> ``http://host:port/v1`` (the OpenAI base)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TargetError(f"--url must look like http://host:port, got {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}/v1"


def parse_models(doc: object) -> FleetModels:
    """Read an OpenAI model list (vLLM's cards: adapters have a ``parent``)."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise TargetError("GET /v1/models did not answer an OpenAI model list ({'data': [...]})")
    bases: list[str] = []
    adapters: list[str] = []
    parents: list[str] = []
    for card in data:
        if not isinstance(card, dict) or not isinstance(card.get("id"), str):
            continue
        parent = card.get("parent")
        if isinstance(parent, str) and parent:
            adapters.append(card["id"])
            parents.append(parent)
        else:
            bases.append(card["id"])
    base = next((p for p in parents if p in bases), bases[0] if bases else None)
    others = tuple(b for b in bases if b != base)
    return FleetModels(base_model=base, adapters=tuple(adapters), others=others)


async def fetch_models(
    base_url: str, *, api_key: str | None, timeout_s: float, proxy: str | None = None
) -> FleetModels:
    """``GET {base_url}/models`` (through ``proxy`` if given); :class:`TargetError` naming the
    cause when it fails."""
    url = base_url + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout, proxy=proxy) as session,
            session.get(url, headers=headers) as resp,
        ):
            body = await resp.read()
            status = resp.status
    except TimeoutError as exc:
        raise TargetError(f"GET {url}: no answer within {timeout_s:g} s", reachable=False) from exc
    except aiohttp.ClientError as exc:
        raise TargetError(f"cannot reach {url}: {exc}", reachable=False) from exc
    if status != 200:
        hint = ""
        if status in (401, 403):
            hint = " (check --api-key or OPENAI_API_KEY)"
        elif status in (404, 405):
            hint = " (a target without a model list: name its models with --models, --base-model)"
        raise TargetError(f"GET {url} answered {status}: {_message(body)}{hint}")
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise TargetError(f"GET {url} did not answer JSON: {body[:120]!r}") from exc
    return parse_models(doc)


def _message(body: bytes) -> str:
    message = error_message(body)
    return repr(body[:200]) if message is None else message


def by_popularity(names: Sequence[str], rates: Sequence[float]) -> list[str]:
    """``names`` from the highest mean rate to the lowest (ties in spec order)."""
    order = sorted(range(len(names)), key=lambda i: (-rates[i], i))
    return [names[i] for i in order]


def map_adapters(spec_adapters: Sequence[str], targets: Sequence[str]) -> dict[str, str]:
    """The i-th of ``spec_adapters`` (most popular first) -> ``targets[i % len(targets)]``."""
    if not targets:
        raise ValueError("no target models to map onto")
    return {name: targets[i % len(targets)] for i, name in enumerate(spec_adapters)}


def describe_mapping(mapping: Mapping[str, str], *, shown: int = 8) -> str:
    """``adapter-000 -> lora-a, adapter-001 -> lora-b, ... (192 more)``."""
    items = list(mapping.items())
    text = ", ".join(f"{a} -> {m}" for a, m in items[:shown])
    return text + (f", ... ({len(items) - shown} more)" if len(items) > shown else "")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelPlan:
    """Which ``model`` each request names: ``mapping`` for the spec's adapters, ``base_model``
    for its base-model requests (None when it has none); ``notes`` tell the user how."""

    base_model: str | None
    mapping: dict[str, str]
    notes: tuple[str, ...]


def plan_models(
    *,
    models: str | Sequence[str],
    base_only: bool,
    base_model: str | None,
    listing: FleetModels | TargetError,
    spec_adapters: Sequence[str],
    spec_has_base: bool,
) -> ModelPlan:
    """Resolve ``--models`` (``auto`` or ``a,b,c``; or a list: the ``--api-keys`` file's
    models), ``--base-only`` and ``--base-model`` against what ``GET /v1/models`` answered (or
    the error it gave). ``spec_adapters`` are in popularity order. Raises
    :class:`TargetError` when the listing was needed and failed. A list of models is not
    checked against the listing (each model's own key may be needed to see it)."""
    fleet = listing if isinstance(listing, FleetModels) else None
    notes: list[str] = []
    keyed = not isinstance(models, str)
    if not isinstance(models, str):
        explicit = list(models)
    else:
        explicit = [] if models == "auto" else [m.strip() for m in models.split(",") if m.strip()]
    if models != "auto" and not explicit:
        raise TargetError(f"--models: expected 'auto' or a comma-separated list, got {models!r}")
    if fleet is None and not explicit and not base_only:
        assert isinstance(listing, TargetError)
        raise listing  # --models auto needs the list
    targets: list[str] = explicit or ([] if fleet is None else list(fleet.adapters))
    to_base = base_only or not targets
    needs_base = spec_has_base or (to_base and bool(spec_adapters))
    base = base_model or (fleet.base_model if fleet is not None else None)
    if needs_base and base is None:
        why = str(listing) if isinstance(listing, TargetError) else "it lists no base model"
        raise TargetError(f"cannot tell the base model from GET /v1/models ({why}): "
                          "pass --base-model")  # fmt: skip
    if isinstance(listing, TargetError):
        notes.append(f"warning: {listing}; going on with --models")
    if fleet is not None and fleet.others and base is not None and not base_model:
        notes.append(f"several base models listed ({', '.join((base, *fleet.others))}): "
                     f"using {base} (--base-model chooses)")  # fmt: skip
    if fleet is not None and explicit and not keyed:
        listed = {*fleet.adapters, *fleet.others, *([fleet.base_model] if fleet.base_model else [])}
        missing = [m for m in explicit if m not in listed]
        if missing:
            notes.append(f"warning: not listed by GET /v1/models: {', '.join(missing)}")
    if not spec_adapters:
        mapping: dict[str, str] = {}
    elif to_base:
        assert base is not None
        mapping = dict.fromkeys(spec_adapters, base)
        why = "--base-only" if base_only else "GET /v1/models lists no LoRA adapter"
        notes.append(f"every adapter request goes to the base model {base} ({why})")
    else:
        mapping = map_adapters(spec_adapters, targets)
        source = "--api-keys" if keyed else "--models" if explicit else "GET /v1/models"
        cycling = ", cycling" if len(targets) < len(spec_adapters) else ""
        notes.append(
            f"{len(spec_adapters)} workload adapters -> {len(targets)} model(s) from {source} "
            f"(most popular first{cycling}): {describe_mapping(mapping)}"
        )
    if spec_has_base:
        notes.append(f"base-model requests go to {base}")
    return ModelPlan(base_model=base, mapping=mapping, notes=tuple(notes))
