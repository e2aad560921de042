"""Who may call, and which models they may name: API keys -> tenants, model -> adapter.

An adapter a tenant may not use is reported exactly like an unknown one (404, vLLM 0.32's
answer: ``errors.VllmNotFoundError``), so other tenants' adapters stay invisible. The catalog
is immutable; a config reload or the admin API swaps in a new one.

``GET /v1/models`` gives vLLM 0.32's cards field for field (``id, object, created, owned_by:
"vllm", root, parent, max_model_len, permission``), so clients and routers in front of the
gateway read it as they read vLLM's: the base model's ``root`` (its path) and ``max_model_len``
are what the replicas' own ``/v1/models`` report (``ReplicaPool.base_model_card``: the smallest
``max_model_len`` of the healthy replicas); an adapter's card has ``parent`` = the base model,
``root`` = its configured path and ``max_model_len: null``, as vLLM's. Paths are shown to
tenants, as vLLM shows them to every caller: a tenant sees the paths of the adapters it may use
(and of the base model), never another tenant's. Before any replica has answered, the base card
has ``root`` = the model name and ``max_model_len: null``.

An adapter whose rank is above the ``max_lora_rank`` of every replica (each one said in its
config: ``gateway.adapter_rank.RankLimits``) is answered 400 (``param: model``) naming the
numbers, to the tenants that may use it, before any routing or load: no replica could load it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping

from loragate.backends.client import ModelCard
from loragate.core.errors import AuthenticationError
from loragate.core.types import AdapterSpec, TenantId
from loragate.gateway.adapter_rank import RankAboveReplicasError, RankLimits
from loragate.gateway.errors import VllmNotFoundError
from loragate.twin.replica_responses import model_card

_BEARER = "bearer "


def _not_found(model: str, base_model: str) -> str:
    # vLLM 0.32's words: "Valid aliases" lists only the base model, never the adapters.
    return f"The model `{model}` does not exist. Valid aliases: {base_model}."


class UnknownModelError(VllmNotFoundError):
    """The catalog holds no adapter named ``model`` (not: one the tenant may not use). The
    client's answer is the same 404; the gateway may first ask the shared store whether another
    instance registered it since this one's last refresh (``SharedState.find_adapter``)."""

    def __init__(self, model: str, base_model: str) -> None:
        super().__init__(_not_found(model, base_model), param="model")
        self.model = model


class Catalog:
    """The models the deployment serves and the tenants allowed to call it."""

    __slots__ = ("_adapters", "_auth_required", "_by_header", "_by_key", "_created", "_models_json",
                 "_rank_limits", "base_model")  # fmt: skip

    def __init__(
        self,
        *,
        base_model: str,
        adapters: Iterable[AdapterSpec] = (),
        api_keys: Mapping[str, TenantId] | None = None,
        rank_limits: RankLimits | None = None,
    ) -> None:
        """``rank_limits``: the replicas' ``max_lora_rank`` (None: unknown, any rank is let
        through to routing)."""
        self.base_model = base_model
        self._rank_limits = rank_limits if rank_limits is not None else RankLimits(None, "")
        self._adapters: dict[str, AdapterSpec] = {a.name: a for a in adapters}
        self._by_key: dict[str, TenantId] = dict(api_keys or {})
        self._by_header = {f"Bearer {k}": t for k, t in self._by_key.items()}
        self._auth_required = bool(self._by_key)
        self._created = int(time.time())
        # tenant -> (the base card's (root, max_model_len) it was built with, the answer)
        self._models_json: dict[TenantId | None, tuple[tuple[str, int | None], bytes]] = {}

    @property
    def auth_required(self) -> bool:
        return self._auth_required

    @property
    def adapters(self) -> Mapping[str, AdapterSpec]:
        return self._adapters

    def tenant_of(self, authorization: str | None) -> TenantId | None:
        """The tenant of an ``Authorization`` header; None when no tenants are configured."""
        if not self._auth_required:
            return None
        if authorization is None:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        tenant = self._by_header.get(authorization)
        if tenant is not None:
            return tenant
        scheme_ok = authorization[:7].lower() == _BEARER
        tenant = self._by_key.get(authorization[7:].strip()) if scheme_ok else None
        if tenant is None:
            raise AuthenticationError("invalid API key")
        return tenant

    def resolve(self, model: str | None, tenant: TenantId | None) -> AdapterSpec | None:
        """The adapter ``model`` names (None = the base model); 404 if unknown
        (:class:`UnknownModelError`) or not allowed (the same answer); 400 if its rank is above
        every replica's known ``max_lora_rank`` (:class:`RankAboveReplicasError`)."""
        if model is None or model == self.base_model:
            return None
        spec = self._adapters.get(model)
        if spec is None:
            raise UnknownModelError(model, self.base_model)
        if not spec.allows(tenant):
            raise VllmNotFoundError(_not_found(model, self.base_model), param="model")
        ceiling = self._rank_limits.ceiling
        if ceiling is not None and spec.rank > ceiling:
            raise RankAboveReplicasError(
                f"model {model!r} cannot be served: its {self._rank_limits.problem(spec.rank)}",
                param="model",
            )
        return spec

    def visible_models(self, tenant: TenantId | None) -> list[str]:
        return [self.base_model] + [n for n, a in self._adapters.items() if a.allows(tenant)]

    def models_json(self, tenant: TenantId | None, base: ModelCard | None = None) -> bytes:
        """The OpenAI model list for ``tenant``, in vLLM 0.32's shape. ``base``: the base model's
        card as the replicas report it (its ``root`` and ``max_model_len``; None: unknown yet).
        Cached per tenant while the base card stays the same."""
        key = (
            (base.root or self.base_model, base.max_model_len)
            if base is not None
            else (self.base_model, None)
        )
        cached = self._models_json.get(tenant)
        if cached is not None and cached[0] == key:
            return cached[1]
        root, max_model_len = key
        data = [self._card(self.base_model, root=root, parent=None, max_model_len=max_model_len)]
        data += [
            self._card(name, root=spec.path, parent=self.base_model, max_model_len=None)
            for name, spec in self._adapters.items()
            if spec.allows(tenant)
        ]
        body = json.dumps({"object": "list", "data": data}).encode()
        self._models_json[tenant] = (key, body)
        return body

    def _card(
        self, model_id: str, *, root: str, parent: str | None, max_model_len: int | None
    ) -> dict[str, object]:
        """One card as vLLM 0.32 writes it. vLLM draws a random permission id per answer; here
        it is derived from the model id and the catalog's creation time (stable, cacheable)."""
        digest = hashlib.sha256(f"{self._created}:{model_id}".encode()).hexdigest()
        return model_card(
            model_id=model_id,
            created=self._created,
            root=root,
            parent=parent,
            max_model_len=max_model_len,
            permission_id=f"modelperm-{digest[:16]}",
        )
