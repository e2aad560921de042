"""Reload a running gateway's config (``POST /admin/reload``, SIGHUP in ``loragate serve``).

The new file is read and validated completely (``load_config``: every section, and the routing
policy built once) before anything changes, so a bad file leaves the old config in force and
the error names the key. It is read in a worker thread: the gateway serves (and answers
``/livez``) while a big file is read. Reloads run one at a time, from the read to the apply
(a later one reads the file once the earlier one is applied, so the newest file is the one
left in force). Then, without dropping a request:

* routing policy, catalog (adapters, tenants, API keys) and request limits are swapped (a
  request already running keeps the policy and limits it started with);
* replicas: new ones are added to the pool (and polled once), removed ones stop getting
  traffic (requests already on them finish, and so do the adapter loads requests wait for
  there), changed ones (URL, key, settings) are replaced, in place, the same way; a failure
  of a request still running on a replaced entry does not take the new one out of rotation.
  Replaced at the same URL (the same vLLM server), a replica keeps what the gateway knew of
  its adapters, and an adapter load running there counts for the new entry. Every new entry
  is built before the pool changes: one that cannot be fails the reload (``error``) with
  nothing changed (an ``api_key`` or URL no HTTP request can carry is refused earlier, as a
  bad file); a new entry whose URL resolves to the server of another one is warned about,
  as at start-up;
* ``admin.token`` and ``metrics.token`` changes take effect at once (with
  ``LORAGATE_ADMIN_TOKEN`` / ``LORAGATE_METRICS_TOKEN``, which win over them, read again and
  checked as the file's values are: a bad one rejects the reload naming the variable; a file
  token a variable overrides is warned about again);
* a new ``base_model`` from the next poll on (a replica that does not serve it gets no
  traffic), but only if at least one replica of the new file serves it now: before anything
  changes, every replica of the new file is asked for its ``/v1/models`` (concurrently,
  within ``poller.timeout_s``), and if none lists the new model the reload is rejected
  (``ConfigError`` naming ``base_model`` and what each replica serves: 400 for
  ``POST /admin/reload``, a logged rejection for SIGHUP) with the running config kept. Before,
  such a reload answered ``reloaded`` and took every replica out of rotation (each one's polls
  then failed as ``wrong_model``). A new model that some replicas serve is a deliberate move
  of the traffic to them: applied, the others named in a WARNING.

``/metrics`` counters never go backwards across a reload: a replaced replica's series count
on, a removed replica's counters keep their last value (its health and in-flight gauges
go) and count on from it if it comes back.

Sections read only at start (``server``, ``state``, ``poller``, the ``limits`` that size
connections, and the ``metrics`` label modes: ``adapter_labels``, ``tenant_labels`` and their
limits) are reported in ``restart_required`` when they changed, and keep their old value.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from loragate.backends.client import VllmClient
from loragate.core.config import GatewayConfig, ReplicaConfig
from loragate.core.errors import ConfigError, LoragateError
from loragate.core.log_fields import about_request
from loragate.gateway.config_file import load_config
from loragate.gateway.config_warnings import warn_ignored_file_tokens, warn_same_servers
from loragate.routing import build_policy

if TYPE_CHECKING:
    from loragate.gateway.app import Gateway

log = logging.getLogger(__name__)

# limits that size connections or the app's body reader: fixed at start.
_STARTUP_LIMITS = ("connect_timeout_s", "admin_timeout_s", "max_upstream_connections",
                   "max_body_bytes")  # fmt: skip
# metrics label modes: which names have their own series must not change while Prometheus
# scrapes (see gateway/label_fold.py).
_STARTUP_METRICS = ("adapter_labels", "adapter_label_limit", "tenant_labels",
                    "tenant_label_limit", "adapter_label_names",
                    "tenant_label_names")  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadResult:
    policy: str
    replicas_added: tuple[str, ...]
    replicas_removed: tuple[str, ...]
    replicas_changed: tuple[str, ...]
    restart_required: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "reloaded",
            "policy": self.policy,
            "replicas_added": list(self.replicas_added),
            "replicas_removed": list(self.replicas_removed),
            "replicas_changed": list(self.replicas_changed),
            "restart_required": list(self.restart_required),
        }


def restart_required(old: GatewayConfig, new: GatewayConfig) -> tuple[str, ...]:
    keys = [n for n in ("server", "state", "poller") if getattr(old, n) != getattr(new, n)]
    keys += [
        f"limits.{name}"
        for name in _STARTUP_LIMITS
        if getattr(old.limits, name) != getattr(new.limits, name)
    ]
    keys += [
        f"metrics.{name}"
        for name in _STARTUP_METRICS
        if getattr(old.metrics, name) != getattr(new.metrics, name)
    ]
    return tuple(keys)


async def reload_from_file(
    gateway: Gateway,
    path: Path | None = None,
    *,
    how: str | None = None,
    request_id: str | None = None,
) -> ReloadResult:
    """Re-read ``path`` (default: the file the gateway started with) and apply it.
    Raises ``ConfigError`` (nothing changed) if the file is bad or there is no file; that is
    logged here (a WARNING naming the file and the reason), however the reload was asked
    for (``POST /admin/reload`` or SIGHUP). Counted in ``loragate_config_reloads_total``.
    ``how``: what asked for it, at the end of its log lines (``POST /admin/reload, request
    <id>``; None: nothing, a SIGHUP); ``request_id``: the request that asked for it, if one
    did (its log lines carry it: ``core.log_fields``)."""
    said = "" if how is None else f" ({how})"
    # One reload at a time, from the read to the apply: two reloads whose reads end out of
    # order (a slow read of a big file, the file rewritten meanwhile) would apply the older
    # file last otherwise, and it would stay in force though both answered ``reloaded``. The
    # later reload reads the file once the earlier one is applied. Requests are served
    # meanwhile (the read is off the loop; ``gateway.lock`` is held only to apply).
    async with gateway.reload_lock:
        result = await _read_and_apply(gateway, path or gateway.config_path, said, request_id)
    new_entries = result.replicas_added + result.replicas_changed
    if new_entries:  # as at start-up (after the count: it may wait for DNS)
        await warn_same_servers(gateway.config.replicas, only=new_entries)
    return result


async def _read_and_apply(
    gateway: Gateway, path: Path | None, said: str, request_id: str | None
) -> ReloadResult:
    """``reload_from_file``'s read, check and apply (under ``gateway.reload_lock``), counted."""
    about = about_request(request_id)
    telemetry = gateway.telemetry
    try:
        if path is None:
            raise ConfigError("the gateway was started without a config file: nothing to reload")
        # Off the event loop: a big file takes a while to read and check (adapter folders
        # are read too), and the gateway serves on meanwhile (a 1,200-adapter file held
        # the loop for seconds: /livez did not answer).
        config = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        telemetry.count_reload("rejected")
        reason = str(exc)
        where = "no config file" if path is None else str(path)
        if where not in reason:  # the YAML and file readers' messages name the file already
            reason = f"{where}: {reason}"
        log.warning(
            "config reload rejected, keeping the running config: %s%s", reason, said, extra=about
        )
        raise
    except Exception:  # reading failed other than as a bad file says (a bug): nothing applied
        telemetry.count_reload("error")
        raise
    try:
        await check_base_model(gateway, config, request_id=request_id)
        result = await apply_config(gateway, config, said=said, request_id=request_id)
    except ConfigError as exc:
        telemetry.count_reload("rejected")
        if exc.key == "base_model":
            log.warning(
                "config reload rejected, keeping the running config: %s: %s%s",
                path, exc, said, extra=about,
            )  # fmt: skip
        raise
    except Exception:
        telemetry.count_reload("error")
        raise
    telemetry.count_reload("ok")
    return result


async def check_base_model(
    gateway: Gateway, new: GatewayConfig, *, request_id: str | None = None
) -> None:
    """Raise ``ConfigError`` (key ``base_model``) if ``new`` changes the base model and no
    replica of ``new`` serves that model now (see the module docstring); warn about the
    replicas that do not serve it if some do. No-op if the model is unchanged or the gateway
    has not started (no session: nothing could be asked)."""
    old_model, model = gateway.config.base_model, new.base_model
    session = gateway.session
    if model == old_model or session is None:
        return
    served = await asyncio.gather(
        *(_served_models(session, r, gateway.config.poller.timeout_s) for r in new.replicas)
    )
    said = {r.replica_id: what for r, what in zip(new.replicas, served, strict=True)}
    serving = [rid for rid, what in said.items() if isinstance(what, tuple) and model in what]
    others = "; ".join(
        f"{rid}: {', '.join(what) or 'no model'}"
        if isinstance(what, tuple)
        else f"{rid}: not asked ({what})"
        for rid, what in said.items()
        if rid not in serving
    )
    if not serving:
        raise ConfigError(
            f"no replica serves {model!r} ({others}): the reload would take every replica out "
            f"of rotation; the running config stays in force (base_model {old_model!r}). Start "
            "replicas serving it first (or list them in the same file), then reload",
            key="base_model",
        )
    if others:
        log.warning(
            "config reload: base_model %r (was %r) is served by %s only; the other replicas "
            "get no traffic (%s)",
            model, old_model, ", ".join(serving), others, extra=about_request(request_id),
        )  # fmt: skip


async def _served_models(
    session: aiohttp.ClientSession, replica: ReplicaConfig, timeout_s: float
) -> tuple[str, ...] | str:
    """The base models ``replica``'s ``/v1/models`` lists now, or why it could not be read."""
    client = VllmClient(session, replica.url, api_key=replica.api_key, poll_timeout_s=timeout_s)
    try:
        return (await client.list_models()).base_models
    except (LoragateError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    finally:
        client.upstream.close()


def log_reload_failure(gateway: Gateway, how: str, request_id: str | None = None) -> None:
    """Log, with its traceback (call it in the ``except`` block), a reload that failed other
    than on a bad file: ``reload_from_file`` counted it as ``error`` and the gateway serves on
    with the running config. ``how``: what asked for it (``SIGHUP``, ``POST /admin/reload``);
    ``request_id``: the request that did, if one did."""
    log.exception(
        "config reload (%s) of %s failed, serving on with the running config "
        "(GET /admin/replicas shows the replicas in use)",
        how, gateway.config_path, extra=about_request(request_id),
    )  # fmt: skip


async def apply_config(
    gateway: Gateway, new: GatewayConfig, *, said: str = "", request_id: str | None = None
) -> ReloadResult:
    """Apply a validated config to a running gateway (see the module docstring). ``said``:
    the end of its log line (what asked for it); ``request_id``: the request that asked for
    it, if one did (its log lines carry it)."""
    async with gateway.lock:
        old = gateway.config
        # Validated by load_config already; build now so nothing below can fail on it.
        policy = build_policy(new.routing.build_spec(), seed=new.routing.seed)
        frozen = restart_required(old, new)
        # Keep the sections that need a restart as they were.
        effective = _keep_startup_sections(old, new)
        added, removed, changed = await _apply_replicas(gateway, old, effective)
        gateway.config = effective
        gateway.policy = policy
        gateway.proxy.set_policy(policy)
        gateway.proxy.set_limits(effective.limits)
        gateway.rebuild_catalog()
        gateway.telemetry.set_config(policy.name, effective.routing)
    result = ReloadResult(
        policy=policy.name,
        replicas_added=added,
        replicas_removed=removed,
        replicas_changed=changed,
        restart_required=frozen,
    )
    log.info(
        "config reloaded: policy %s, replicas +%s -%s ~%s%s",
        policy.name,
        list(added),
        list(removed),
        list(changed),
        said,
        extra=about_request(request_id),
    )
    warn_ignored_file_tokens(effective, when="at reload")
    if frozen:  # the operator asked for something that did not happen: say so louder
        log.warning(
            "config reloaded, but these sections keep their old values until a restart: %s",
            ", ".join(frozen),
            extra=about_request(request_id),
        )
    return result


def _keep_startup_sections(old: GatewayConfig, new: GatewayConfig) -> GatewayConfig:
    limits = dataclasses.replace(
        new.limits, **{name: getattr(old.limits, name) for name in _STARTUP_LIMITS}
    )
    metrics = dataclasses.replace(
        new.metrics, **{name: getattr(old.metrics, name) for name in _STARTUP_METRICS}
    )
    return dataclasses.replace(
        new, server=old.server, state=old.state, poller=old.poller, limits=limits, metrics=metrics
    )


async def _apply_replicas(
    gateway: Gateway, old: GatewayConfig, new: GatewayConfig
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    pool, shared = gateway.pool, gateway.shared
    before = {r.replica_id: r for r in old.replicas}
    after = {r.replica_id: r for r in new.replicas}
    added = tuple(rid for rid in after if rid not in before)
    removed = tuple(rid for rid in before if rid not in after)
    changed = tuple(rid for rid in after if rid in before and before[rid] != after[rid])
    # Built first: a replica whose client cannot be made fails the reload with nothing changed.
    fresh = pool.add_replicas(tuple(after[rid] for rid in added + changed))
    # Replicas polled from now on (the added ones below first) must serve this model.
    pool.base_model = new.base_model
    for rid in changed:
        shared.forget_replica(rid)
    await shared.register_replicas(tuple(after[rid] for rid in added + changed))
    await pool.poll_replicas(fresh)
    for rid in removed:
        pool.remove_replica(rid)
        shared.forget_replica(rid)
    return added, removed, changed
