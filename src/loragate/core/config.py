"""Gateway configuration: a plain mapping (parsed from YAML by the caller) -> frozen dataclasses.

All validation lives here, so a bad file fails at load time with one :class:`ConfigError` that
names the offending key (``replicas[1].url``), never per request; a key that is not one of its
mapping's is reported before anything else there, with the nearest known key as a hint
(``limits.request_timout_s: unknown key (is 'request_timout_s' a misspelling of
'request_timeout_s'?)``). The ``routing:`` section, read by ``loragate.routing.build_policy``
(whose errors say the same of its keys), may expand to at most ``MAX_ROUTING_VALUES`` values:
YAML aliases of aliases are refused before they are copied. ``core`` may not import ``yaml``
(see ``tests/test_architecture.py``); ``loragate.gateway.config_file.load_config`` reads the
file, calls :func:`config_from_mapping` and puts the file, line and column of the key in front
of its errors.

Example (see ``examples/gateway.yaml``)::

    base_model: tiny-llama
    replicas:
      - {id: r0, url: "http://127.0.0.1:18101", settings: {max_loras: 2}}
    adapters:
      - {name: lora-0, path: /loras/lora-0, rank: 8, tenants: [acme]}
    tenants:
      - {name: acme, api_keys: [sk-acme]}
    routing: least_loaded          # or a mapping passed to loragate.routing.build_policy
    limits: {max_body_bytes: 1048576, request_timeout_s: 600}
    poller: {interval_s: 0.5}
    state: {backend: redis, redis_url: "redis://127.0.0.1:6379/0"}   # default: memory
    admin: {token: change-me}      # env LORAGATE_ADMIN_TOKEN wins; no token = no admin API
    metrics: {token: scrape-me}    # env LORAGATE_METRICS_TOKEN wins; none = /metrics is open
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from loragate.core.errors import ConfigError
from loragate.core.types import (
    MAX_ADAPTER_RANK,
    AdapterSpec,
    ReplicaSettings,
    max_lora_rank_problem,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaConfig:
    """One vLLM (or simulated) replica. ``settings`` None = use defaults / discover."""

    replica_id: str
    url: str
    api_key: str | None = None
    settings: ReplicaSettings | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantConfig:
    name: str
    api_keys: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingConfig:
    """The ``routing:`` section. ``spec`` is what ``loragate.routing.build_policy`` takes:
    a policy name or a read-only mapping (converted back to a dict by :meth:`build_spec`)."""

    spec: str | Mapping[str, Any] = "round_robin"
    seed: int = 0

    def build_spec(self) -> str | dict[str, Any]:
        return self.spec if isinstance(self.spec, str) else _thaw(self.spec)


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_body_bytes: int = 4 * 1024 * 1024
    connect_timeout_s: float = 3.0
    # A non-streaming request's whole answer (-> 504), and any request's wait for an adapter
    # load on its replica (then it is retried on another).
    request_timeout_s: float = 600.0
    # Longest silence of a streaming request's replica: until its response head (-> 504), and
    # from then on until each chunk (-> an SSE error event). vLLM sends a stream's head as soon
    # as it accepted the request; the wait in its queue and the prefill come before the first
    # chunk. So the wait for the head is timed as every silence of the stream, whether a
    # replica sends its head at once or with its first token.
    stream_read_timeout_s: float = 300.0
    # Longest silence while reading a client's request body before a 408.
    client_body_timeout_s: float = 60.0
    # Longest time a client may take to send a complete request head (from the connection's
    # start, or from the first byte of a later request head on a keep-alive connection);
    # then the connection is closed (gateway.head_deadline).
    client_header_timeout_s: float = 30.0
    # Longest time a write of a stream to its client may wait with the client taking none of
    # its bytes (its socket's buffers full: it stopped reading); then the client's connection
    # is closed and the request ends as client_closed (the replica's connection too: vLLM
    # aborts the generation). As nginx's send_timeout: a client that reads, however slowly,
    # is not cut.
    client_write_timeout_s: float = 60.0
    admin_timeout_s: float = 60.0
    # A request in progress on a replica that stopped listening (its poll could not connect)
    # fails once it has received nothing for this long (retried elsewhere if nothing reached
    # the client; a stream that had sent output ends with an error event). So do the requests
    # in progress on a replica that stopped answering (poller.timeouts_to_unhealthy polls in a
    # row timed out) once none of them has received anything for this long.
    stopped_replica_grace_s: float = 5.0
    # Idle keep-alive connections kept open to each replica for proxied requests.
    max_upstream_connections: int = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class PollerConfig:
    interval_s: float = 0.5
    timeout_s: float = 2.0
    # Consecutive failed polls before a replica is taken out of rotation (a failed proxy
    # connection takes it out at once; one successful poll brings it back).
    failures_to_unhealthy: int = 1
    # Consecutive poll *timeouts* before a replica is taken out (a timeout is weak evidence:
    # on a busy host a healthy replica's poll can miss timeout_s now and then); a refused
    # connect or a bad answer counts by failures_to_unhealthy.
    timeouts_to_unhealthy: int = 2
    # A replica that refused to load an adapter (vLLM's 4xx/5xx on /v1/load_lora_adapter: no
    # --enable-lora, a rank above its --max-lora-rank, a folder it cannot read) gets no requests
    # for that adapter for this long, unless no other replica can take them (0: no memory).
    adapter_refusal_ttl_s: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # On SIGTERM/SIGINT: how long requests in flight may run on before they are answered
    # with an error (below Kubernetes' default terminationGracePeriodSeconds of 30 s).
    shutdown_timeout_s: float = 25.0
    # On SIGTERM/SIGINT, before that: how long the gateway keeps accepting and serving while
    # GET /readyz answers 503 (Kubernetes removes a pod from its Service's endpoints only after
    # the SIGTERM; 0: stop accepting at once).
    shutdown_delay_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StateConfig:
    """The ``state:`` section: where gateway instances share residency, in-flight leases,
    demand and the adapter registry. ``memory`` = embedded, one instance, no Redis."""

    backend: str = "memory"  # "memory" | "redis"
    redis_url: str | None = None
    key_prefix: str = "loragate:"
    # Each Redis call gives up after this long (then the gateway serves from its local view).
    op_timeout_s: float = 0.5
    # After a timeout, Redis counts as unreachable (the WARNING, loragate_state_resyncs) only
    # once it has not answered for this long, or a reconnection failed otherwise; answering
    # sooner is a blip (INFO, loragate_state_blips). A refused connection is an outage at once.
    # 0: every timeout is an outage.
    outage_warning_s: float = 2.0
    # How often the local view is refreshed from Redis (other instances' in-flight counts,
    # residency, adapter registry).
    refresh_s: float = 0.25
    # In-flight leases of a crashed gateway stop counting after lease_ttl_s.
    lease_ttl_s: float = 30.0
    lease_renew_s: float = 10.0
    # Background housekeeping period (lease renewal, refresh, reconnect attempts).
    maintenance_interval_s: float = 0.05
    # How long an adapter deleted through the admin API stays tombstoned: any instance's poller
    # unloads it from a replica that lists it meanwhile (e.g. loaded back by an instance that
    # had not refreshed yet). It must cover a stale instance's refresh, an on-demand load it
    # began before that (up to limits.admin_timeout_s; seconds on real vLLM) and one poll.
    tombstone_ttl_s: float = 30.0
    # While Redis is unreachable, reconnect attempts back off from 0.1 s, doubling up to this
    # (+ up to 20% jitter): a returning Redis is noticed within about 1.2 x this.
    reconnect_max_backoff_s: float = 5.0
    # Per-adapter request counts are kept in one bucket per 10 s (Redis: one hash per bucket,
    # P demand:<bucket>, written on every request) for this long: on Redis the key count grows
    # for this long, then levels off at retention / 10 s keys (8,640 for a day).
    demand_retention_s: float = 86400.0


ADMIN_TOKEN_ENV = "LORAGATE_ADMIN_TOKEN"
METRICS_TOKEN_ENV = "LORAGATE_METRICS_TOKEN"


class EnvironmentVariableError(ConfigError):
    """A bad value of an environment variable read with the config file (its key names the
    variable): not in the file, so no line of it is named."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__(error.message)
        self.key = error.key
        self.param = error.key


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """The ``admin:`` section. ``token``: ``LORAGATE_ADMIN_TOKEN`` if set (read with the file),
    else ``admin.token``. Without one the ``/admin`` routes answer 404. ``file_token_ignored``:
    the file sets another ``admin.token``, which the variable overrides (the gateway warns)."""

    token: str | None = None
    file_token_ignored: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """The ``metrics:`` section. ``token``: ``LORAGATE_METRICS_TOKEN`` if set (read with the
    file), else ``metrics.token``. With one, ``GET /metrics`` needs ``Authorization: Bearer
    <token>`` (Prometheus: ``authorization: {credentials: ...}``); without one it is open.
    ``file_token_ignored``: as ``AdminConfig``'s. ``loop_lag_interval_s``: how often the
    gateway checks how late its own event loop runs (``loragate_event_loop_lag_seconds``);
    ``loop_lag_warning_s``: a lag from which a WARNING says so (at most one a minute). A reload
    applies both from the next check.

    ``adapter_labels`` / ``tenant_labels``: what the ``adapter`` / ``tenant`` label of every
    family that has one holds (``LABEL_MODES``): ``all`` (every name: one series per adapter,
    unbounded), ``first_n`` (the first ``adapter_label_limit`` / ``tenant_label_limit`` names
    keep their own value for the instance's lifetime: the config file's adapters / tenants
    first, in file order, so every instance reading the file keeps the same ones, then those
    this instance counts first; any later one is counted as
    ``__other__``: at most limit + 2 values with the base model's ``''``), ``listed`` (the
    names of ``adapter_label_names`` / ``tenant_label_names`` keep their own value, every
    other is ``__other__``: the same names on every instance and across restarts, whatever
    registered them, for adapters the admin API adds), ``none`` (every
    name is ``__other__``). Prometheus cannot drop a series once scraped, so the names kept
    never change while the gateway runs: read at start only (a reload reports a change in
    ``restart_required``)."""

    token: str | None = None
    file_token_ignored: bool = False
    loop_lag_interval_s: float = 0.25
    loop_lag_warning_s: float = 1.0
    adapter_labels: str = "first_n"
    adapter_label_limit: int = 20
    tenant_labels: str = "first_n"
    tenant_label_limit: int = 20
    adapter_label_names: tuple[str, ...] = ()
    tenant_label_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    base_model: str
    replicas: tuple[ReplicaConfig, ...]
    adapters: tuple[AdapterSpec, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    poller: PollerConfig = field(default_factory=PollerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    state: StateConfig = field(default_factory=StateConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def auth_required(self) -> bool:
        return bool(self.tenants)

    def tenant_by_key(self) -> dict[str, str]:
        """API key -> tenant name."""
        return {key: t.name for t in self.tenants for key in t.api_keys}


# ---------------------------------------------------------------------------------------------
# Parsing helpers: each takes the dotted key path so errors can name it.


# Most values (mappings, lists and scalars, each counted every time it is reached) a routing
# section may hold once its YAML aliases are expanded. A routing section needs a few dozen; an
# alias repeated 8 times per level reaches billions in a file of a few hundred bytes, and
# copying it (``_freeze``, ``_thaw``) would take minutes.
MAX_ROUTING_VALUES = 10_000


class _Budget:
    """Values left to copy; spent as they are reached, so the cap trips before the work."""

    __slots__ = ("left",)

    def __init__(self, values: int = MAX_ROUTING_VALUES) -> None:
        self.left = values

    def spend(self, key: str) -> None:
        self.left -= 1
        if self.left < 0:
            raise ConfigError(
                f"the routing section expands to more than {MAX_ROUTING_VALUES:,} values "
                "(YAML aliases repeat what their anchor holds; a routing section needs a few "
                "dozen)",
                key=key,
            )


def check_routing_size(spec: object, key: str = "routing") -> None:
    """Refuse a routing spec (as ``build_policy`` takes it, from any YAML reader) that expands
    to more than ``MAX_ROUTING_VALUES`` values, before anything reads or prints it whole."""
    budget = _Budget()
    stack: list[tuple[str, object]] = [(key, spec)]
    while stack:
        path, value = stack.pop()
        budget.spend(path)
        if isinstance(value, Mapping):
            stack.extend((f"{path}.{k}", v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list | tuple):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))


def _thaw(value: Any, key: str = "routing", budget: _Budget | None = None) -> Any:
    """A plain copy (dicts and lists) of a routing spec; at most ``MAX_ROUTING_VALUES``."""
    budget = _Budget() if budget is None else budget
    budget.spend(key)
    if isinstance(value, Mapping):
        return {k: _thaw(v, f"{key}.{k}", budget) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_thaw(v, f"{key}[{i}]", budget) for i, v in enumerate(value)]
    return value


def _freeze(
    value: Any, key: str, inside: frozenset[int] = frozenset(), budget: _Budget | None = None
) -> Any:
    """A read-only copy; a mapping or list that contains itself (a YAML alias inside its own
    anchor) is an error naming where, not endless recursion, and so is one that expands to
    more than ``MAX_ROUTING_VALUES`` values (aliases of aliases), before it is copied."""
    budget = _Budget() if budget is None else budget
    budget.spend(key)
    if not isinstance(value, Mapping | list):
        return value
    if id(value) in inside:
        raise ConfigError("contains itself (a YAML alias inside its own anchor)", key=key)
    inside |= {id(value)}
    if isinstance(value, Mapping):
        return types.MappingProxyType(
            {k: _freeze(v, f"{key}.{k}", inside, budget) for k, v in value.items()}
        )
    return tuple(_freeze(v, f"{key}[{i}]", inside, budget) for i, v in enumerate(value))


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _mapping(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {_type_name(value)}", key=key)
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"keys must be strings, got {k!r}", key=key)
    return value


def _sequence(value: object, key: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"expected a list, got {_type_name(value)}", key=key)
    return value


def nearest(name: str, known: Collection[str]) -> str | None:
    """The one of ``known`` that ``name`` is most likely a misspelling of, if any is close."""
    near = difflib.get_close_matches(name, sorted(known), n=1)
    return near[0] if near else None


def misspelling(name: str, known: Collection[str]) -> str | None:
    """``is 'NAME' a misspelling of 'KNOWN'?`` for the nearest of ``known``, if any is close."""
    near = nearest(name, known)
    return None if near is None else f"is {name!r} a misspelling of {near!r}?"


def unknown_key(name: str, allowed: Collection[str]) -> str:
    """What is wrong with key ``name`` where only ``allowed`` are read: the nearest allowed
    key as a hint when one is close, else the list."""
    hint = misspelling(name, allowed)
    if hint is not None:
        return f"unknown key ({hint})"
    return f"unknown key (allowed: {', '.join(sorted(allowed))})"


def _check_keys(data: Mapping[str, Any], allowed: set[str], key: str) -> None:
    for k in data:
        if k not in allowed:
            raise ConfigError(unknown_key(k, allowed), key=f"{key}.{k}" if key else k)


def _str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"expected a non-empty string, got {_type_name(value)}", key=key)
    return value


def _int(value: object, key: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected an integer, got {_type_name(value)}", key=key)
    if value < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value}", key=key)
    if maximum is not None and value > maximum:
        raise ConfigError(f"must be <= {maximum}, got {value}", key=key)
    return value


def _seconds(value: object, key: str, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"expected a number of seconds, got {_type_name(value)}", key=key)
    what = "a number of seconds >= 0" if zero else "a positive number of seconds"
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond any float (10**309): not echoed, it is long
        raise ConfigError(
            f"must be {what}, got an integer too large for a number of seconds", key=key
        ) from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        raise ConfigError(f"must be {what}, got {value}", key=key)
    return seconds


def _url(value: object, key: str) -> str:
    url = _str(value, key)
    # urlsplit silently drops tabs and CR/LF, and the proxy writes the URL's host and path into
    # its request head as Latin-1: only a URL as it goes on the wire (IDN hosts in punycode,
    # other characters percent-encoded).
    _printable_ascii(
        url, key, "the URL goes into HTTP request lines and headers as written", spaces=False
    )
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL", brackets around what is not an address
        raise ConfigError(f"not a URL: {exc} in {url!r}", key=key) from exc
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(
            f"a replica URL has no query or fragment (requests go to <url>/v1/...), got {url!r}",
            key=key,
        )
    if "@" in parts.netloc:  # not echoed: it may hold a password
        raise ConfigError(
            "credentials in the URL are not sent to the replica (they would end up in the "
            "Host header): give the replica's key as api_key",
            key=key,
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"expected an http(s) URL, got {url!r}", key=key)
    if not _HOST_PORT.fullmatch(parts.netloc):
        # urlsplit takes "[::1]x", "x[::1]" and a backslash; aiohttp's URLs refuse them
        # (ValueError when the poller first asks the replica).
        raise ConfigError(
            f"bad host in {url!r}: a name or address, an IPv6 address in [brackets], then "
            "an optional :port",
            key=key,
        )
    try:
        port = parts.port
    except ValueError as exc:  # out of range, or not a number
        raise ConfigError(f"bad port in {url!r} ({exc}; a port is 1-65535)", key=key) from exc
    if port == 0:  # would connect to the scheme's default port instead
        raise ConfigError(f"bad port in {url!r} (a port is 1-65535)", key=key)
    return url.rstrip("/")


_DEFAULT_PORTS = {"http": 80, "https": 443}

# A URL's host and port as HTTP clients take them: a name or address without brackets or
# backslashes, or one [IPv6 address]; then a port (checked by urlsplit's ``port``).
_HOST_PORT = re.compile(r"(?:\[[^\[\]]*\]|[^\[\]\\:]*)(?::[^\[\]\\]*)?")


def replica_address(url: str) -> str:
    """The server a (validated) replica URL points at, for comparing two: scheme and host
    lower-cased, the scheme's default port written out, no trailing slash. Names are not
    resolved (``localhost`` and ``127.0.0.1`` differ here)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


# The value a metric's adapter or tenant label takes for the names it folds
# (metrics.adapter_labels / tenant_labels; gateway/label_fold.py): no adapter nor tenant may be
# named so, or its series would add up with the folded ones.
RESERVED_LABEL = "__other__"


def _reserved_problem(name: str, what: str) -> str | None:
    if name == RESERVED_LABEL:
        return (
            f"{RESERVED_LABEL!r} is reserved and cannot name {what}: it is the metric label "
            "value of the names metrics.adapter_labels / metrics.tenant_labels fold"
        )
    return None


def adapter_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an adapter, or None. vLLM 0.32 takes any non-empty
    ``lora_name`` (``org/name`` too, as its Hugging Face resolver names them); refused here is
    only what ``DELETE /admin/adapters/{name}`` could not address: a ``.`` or ``..`` path
    segment (HTTP clients remove them from a URL before sending it; curl, aiohttp, requests)
    and control characters (no route matches a newline; in a log line one would start a forged
    line), and ``RESERVED_LABEL`` (the metrics' folded value). Config-file and
    admin-registered adapters follow the same rule."""
    if (problem := _reserved_problem(name, "an adapter")) is not None:
        return problem
    for i, ch in enumerate(name):
        if ch < " " or "\x7f" <= ch <= "\x9f":
            return (
                f"character {ch!a} at position {i} is not allowed in an adapter name: no "
                "control characters (DELETE /admin/adapters/<name> cannot reach a newline, and "
                "they garble log lines)"
            )
    if any(part in (".", "..") for part in name.split("/")):
        return (
            "'.' and '..' are not allowed as /-separated parts of an adapter name: HTTP clients "
            "remove them from the URL of DELETE /admin/adapters/<name>"
        )
    return None


def adapter_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be an adapter's path, or None: a control character (NUL ends a
    path for the operating system: ``os.stat`` and ``os.path.expanduser`` raise on it, and
    vLLM cannot open it; the others are no file name an operator means, and garble log
    lines) or a lone surrogate (no UTF-8 for the file system or the replica). Config-file and
    admin-registered adapters follow the same rule."""
    for i, ch in enumerate(path):
        if ch < " " or "\x7f" <= ch <= "\x9f":
            return (
                f"character {ch!a} at position {i} is not allowed in an adapter path: no "
                "control characters (a NUL cannot be in a file name, and the others garble "
                "log lines)"
            )
        if "\ud800" <= ch <= "\udfff":
            return (
                f"character {ch!a} at position {i} is not allowed in an adapter path: a lone "
                "surrogate is not a character (it has no UTF-8 for a file name)"
            )
    return None


def _str_list(value: object, key: str) -> tuple[str, ...]:
    return tuple(_str(v, f"{key}[{i}]") for i, v in enumerate(_sequence(value, key)))


def _printable_ascii(text: str, key: str, why: str, *, spaces: bool) -> str:
    """``text`` unless a character of it is not printable ASCII (or a space, unless
    ``spaces``), or it starts or ends with a space: the error names the character and its
    position, never the text (a key or token)."""
    for i, ch in enumerate(text):
        if not ("!" <= ch <= "~" or (spaces and ch == " ")):
            allowed = "printable ASCII" if spaces else "printable ASCII without spaces"
            raise ConfigError(
                f"character {ch!a} at position {i} is not allowed: only {allowed}, because {why}",
                key=key,
            )
    if text != text.strip(" "):
        raise ConfigError(
            f"starts or ends with a space, which HTTP strips from a header value; {why}",
            key=key,
        )
    return text


def _header_value(value: object, key: str, why: str) -> str:
    """A string that goes into an HTTP header: one with CR/LF would inject header lines (the
    upstream pool writes its request head itself), one outside Latin-1 cannot be encoded at
    all, and the two replica clients encode the rest differently (Latin-1, UTF-8)."""
    return _printable_ascii(_str(value, key), key, why, spaces=True)


_KEY_SENT = "it is sent to the replica in an HTTP header (Authorization: Bearer ...)"
_KEY_MATCHED = (
    "clients send it in an HTTP header (Authorization: Bearer ...), which cannot carry that"
)


# ---------------------------------------------------------------------------------------------
# Sections


_SETTINGS_KEYS = {
    "max_loras",
    "max_cpu_loras",
    "max_lora_rank",
    "max_num_seqs",
    "max_num_batched_tokens",
}


def _settings(value: object, key: str) -> ReplicaSettings:
    data = _mapping(value, key)
    _check_keys(data, _SETTINGS_KEYS, key)
    kwargs = {k: _int(v, f"{key}.{k}", minimum=1) for k, v in data.items()}
    rank_problem = max_lora_rank_problem(kwargs.get("max_lora_rank", 16))
    if rank_problem is not None:  # vLLM refuses to start so (16: its default)
        raise ConfigError(rank_problem, key=f"{key}.max_lora_rank")
    if "max_loras" in kwargs and "max_cpu_loras" not in kwargs:
        kwargs["max_cpu_loras"] = kwargs["max_loras"]  # vLLM's default for --max-cpu-loras
    # Said: routing keeps higher ranks off the replica (vLLM's default 16 is only assumed).
    settings = ReplicaSettings(**kwargs, max_lora_rank_known="max_lora_rank" in kwargs)
    if settings.max_cpu_loras < settings.max_loras:  # vLLM refuses to start so
        raise ConfigError(
            f"max_cpu_loras ({settings.max_cpu_loras}) must be at least max_loras "
            f"({settings.max_loras}), as vLLM requires",
            key=f"{key}.max_cpu_loras",
        )
    return settings


def _replicas(value: object) -> tuple[ReplicaConfig, ...]:
    items = _sequence(value, "replicas")
    if not items:
        raise ConfigError("at least one replica is required", key="replicas")
    out: list[ReplicaConfig] = []
    seen: set[str] = set()
    addresses: dict[str, str] = {}  # replica_address -> the key that gave it first
    for i, raw in enumerate(items):
        key = f"replicas[{i}]"
        if isinstance(raw, str):  # shorthand: just the URL
            raw = {"url": raw}
        data = _mapping(raw, key)
        _check_keys(data, {"id", "url", "api_key", "settings"}, key)
        if "url" not in data:
            raise ConfigError("missing required key", key=f"{key}.url")
        rid = _header_value(
            data.get("id", f"r{i}"),
            f"{key}.id",
            "it is sent to clients in the X-Loragate-Replica response header",
        )
        if rid in seen:
            raise ConfigError(f"duplicate replica id {rid!r}", key=f"{key}.id")
        seen.add(rid)
        url = _url(data["url"], f"{key}.url")
        address = replica_address(url)
        if address in addresses:
            raise ConfigError(
                f"{data['url']!r} is the same server as {addresses[address]} ({address}): one vLLM "
                "server listed twice would be modelled as two (two shadow residencies, its "
                "load counted twice)",
                key=f"{key}.url",
            )
        addresses[address] = f"{key}.url"
        api_key = data.get("api_key")
        out.append(
            ReplicaConfig(
                replica_id=rid,
                url=url,
                api_key=None
                if api_key is None
                else _header_value(api_key, f"{key}.api_key", _KEY_SENT),
                settings=None
                if data.get("settings") is None
                else _settings(data["settings"], f"{key}.settings"),
            )
        )
    return tuple(out)


def _tenants(value: object) -> tuple[TenantConfig, ...]:
    out: list[TenantConfig] = []
    names: set[str] = set()
    keys: set[str] = set()
    for i, raw in enumerate(_sequence(value, "tenants")):
        key = f"tenants[{i}]"
        data = _mapping(raw, key)
        _check_keys(data, {"name", "api_keys"}, key)
        for required in ("name", "api_keys"):
            if required not in data:
                raise ConfigError("missing required key", key=f"{key}.{required}")
        name = _str(data["name"], f"{key}.name")
        if name in names:
            raise ConfigError(f"duplicate tenant {name!r}", key=f"{key}.name")
        if (problem := _reserved_problem(name, "a tenant")) is not None:
            raise ConfigError(problem, key=f"{key}.name")
        names.add(name)
        api_keys = _str_list(data["api_keys"], f"{key}.api_keys")
        if not api_keys:
            raise ConfigError("a tenant needs at least one API key", key=f"{key}.api_keys")
        for j, api_key in enumerate(api_keys):
            _header_value(api_key, f"{key}.api_keys[{j}]", _KEY_MATCHED)
            if api_key in keys:
                raise ConfigError("API key used twice", key=f"{key}.api_keys[{j}]")
            keys.add(api_key)
        out.append(TenantConfig(name=name, api_keys=frozenset(api_keys)))
    return tuple(out)


def _adapters(value: object, *, base_model: str, tenants: set[str]) -> tuple[AdapterSpec, ...]:
    out: list[AdapterSpec] = []
    names: set[str] = set()
    for i, raw in enumerate(_sequence(value, "adapters")):
        key = f"adapters[{i}]"
        data = _mapping(raw, key)
        _check_keys(data, {"name", "path", "rank", "tenants"}, key)
        for required in ("name", "path"):
            if required not in data:
                raise ConfigError("missing required key", key=f"{key}.{required}")
        name = _str(data["name"], f"{key}.name")
        if (problem := adapter_name_problem(name)) is not None:
            raise ConfigError(problem, key=f"{key}.name")
        if name == base_model:
            raise ConfigError("an adapter cannot be named like the base model", key=f"{key}.name")
        if name in names:
            raise ConfigError(f"duplicate adapter {name!r}", key=f"{key}.name")
        names.add(name)
        path = _str(data["path"], f"{key}.path")
        if (problem := adapter_path_problem(path)) is not None:
            raise ConfigError(problem, key=f"{key}.path")
        allowed: frozenset[str] | None = None
        if data.get("tenants") is not None:
            listed = _str_list(data["tenants"], f"{key}.tenants")
            for j, tenant in enumerate(listed):
                if tenant not in tenants:
                    raise ConfigError(f"unknown tenant {tenant!r}", key=f"{key}.tenants[{j}]")
            allowed = frozenset(listed)
        out.append(
            AdapterSpec(
                name=name,
                path=path,
                rank=_int(data.get("rank", 8), f"{key}.rank", minimum=1, maximum=MAX_ADAPTER_RANK),
                tenants=allowed,
            )
        )
    return tuple(out)


def _routing(value: object) -> RoutingConfig:
    if isinstance(value, str):
        return RoutingConfig(spec=_str(value, "routing"))
    data = dict(_mapping(value, "routing"))
    seed = _int(data.pop("seed", 0), "routing.seed", minimum=0)
    if not data:
        raise ConfigError("empty routing section", key="routing")
    return RoutingConfig(spec=_freeze(data, "routing", frozenset({id(value)})), seed=seed)


def _limits(value: object) -> LimitsConfig:
    data = _mapping(value, "limits")
    seconds = {
        "connect_timeout_s",
        "request_timeout_s",
        "stream_read_timeout_s",
        "client_body_timeout_s",
        "client_header_timeout_s",
        "client_write_timeout_s",
        "admin_timeout_s",
        "stopped_replica_grace_s",
    }
    counts = {"max_body_bytes", "max_upstream_connections"}
    _check_keys(data, seconds | counts, "limits")
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        kwargs[k] = (
            _seconds(v, f"limits.{k}") if k in seconds else _int(v, f"limits.{k}", minimum=1)
        )
    return LimitsConfig(**kwargs)


def _poller(value: object) -> PollerConfig:
    data = _mapping(value, "poller")
    keys = {
        "interval_s",
        "timeout_s",
        "failures_to_unhealthy",
        "timeouts_to_unhealthy",
        "adapter_refusal_ttl_s",
    }
    _check_keys(data, keys, "poller")
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        if k in ("failures_to_unhealthy", "timeouts_to_unhealthy"):
            kwargs[k] = _int(v, f"poller.{k}", minimum=1)
        elif k == "adapter_refusal_ttl_s":
            kwargs[k] = _seconds(v, f"poller.{k}", zero=True)
        else:
            kwargs[k] = _seconds(v, f"poller.{k}")
    return PollerConfig(**kwargs)


def _server(value: object) -> ServerConfig:
    data = _mapping(value, "server")
    _check_keys(data, {"host", "port", "shutdown_timeout_s", "shutdown_delay_s"}, "server")
    kwargs: dict[str, Any] = {}
    if "host" in data:
        kwargs["host"] = _str(data["host"], "server.host")
    if "port" in data:
        port = _int(data["port"], "server.port", minimum=0)
        if port > 65535:
            raise ConfigError(f"must be <= 65535, got {port}", key="server.port")
        kwargs["port"] = port
    if "shutdown_timeout_s" in data:
        kwargs["shutdown_timeout_s"] = _seconds(
            data["shutdown_timeout_s"], "server.shutdown_timeout_s"
        )
    if "shutdown_delay_s" in data:
        kwargs["shutdown_delay_s"] = _seconds(
            data["shutdown_delay_s"], "server.shutdown_delay_s", zero=True
        )
    return ServerConfig(**kwargs)


_STATE_SECONDS = {
    "op_timeout_s",
    "refresh_s",
    "lease_ttl_s",
    "lease_renew_s",
    "maintenance_interval_s",
    "tombstone_ttl_s",
    "reconnect_max_backoff_s",
    "demand_retention_s",
}


def _redis_url(value: object, key: str) -> str:
    url = _str(value, key)
    try:  # the Redis client reads the URL with urlparse, port included
        parts = urlsplit(url)
        _ = parts.port  # a ValueError for a port that is not one
    except ValueError as exc:
        raise ConfigError(f"not a Redis URL: {exc} in {url!r}", key=key) from exc
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"expected a redis://, rediss:// or unix:// URL, got {url!r}", key=key)
    return url


def _state(value: object) -> StateConfig:
    data = _mapping(value, "state")
    _check_keys(
        data, {"backend", "redis_url", "key_prefix", "outage_warning_s"} | _STATE_SECONDS, "state"
    )
    kwargs: dict[str, Any] = {}
    backend = _str(data.get("backend", "memory"), "state.backend")
    if backend not in ("memory", "redis"):
        raise ConfigError(f"expected 'memory' or 'redis', got {backend!r}", key="state.backend")
    kwargs["backend"] = backend
    if data.get("redis_url") is not None:
        kwargs["redis_url"] = _redis_url(data["redis_url"], "state.redis_url")
    elif backend == "redis":
        raise ConfigError("required when state.backend is 'redis'", key="state.redis_url")
    if "key_prefix" in data:
        kwargs["key_prefix"] = _str(data["key_prefix"], "state.key_prefix")
    for k in _STATE_SECONDS & data.keys():
        kwargs[k] = _seconds(data[k], f"state.{k}")
    if "outage_warning_s" in data:
        kwargs["outage_warning_s"] = _seconds(
            data["outage_warning_s"], "state.outage_warning_s", zero=True
        )
    config = StateConfig(**kwargs)
    if config.lease_renew_s >= config.lease_ttl_s:
        raise ConfigError(
            f"must be below state.lease_ttl_s ({config.lease_ttl_s})", key="state.lease_renew_s"
        )
    return config


def _check_tombstone_ttl(state: StateConfig, poller: PollerConfig) -> None:
    """A tombstone does its work only if every instance sees it: one that has not refreshed
    yet reads it at its next refresh (``state.refresh_s``) and unloads the adapter at its next
    poll after that (``poller.interval_s``). Twice that, so a late refresh or poll still finds
    it."""
    least = 2 * (state.refresh_s + poller.interval_s)
    if state.tombstone_ttl_s < least:
        raise ConfigError(
            f"must be at least {least:g} s, twice (state.refresh_s {state.refresh_s:g} + "
            f"poller.interval_s {poller.interval_s:g}), got {state.tombstone_ttl_s:g}: an "
            "instance that has not refreshed sees a deleted adapter's tombstone only at its "
            "next refresh and unloads the adapter at the poll after that, so a shorter "
            "tombstone can expire unseen and the adapter stay loaded on a replica",
            key="state.tombstone_ttl_s",
        )


def _token(
    section: object,
    name: str,
    environ: Mapping[str, str],
    env: str,
    more_keys: Collection[str] = (),
) -> tuple[str | None, bool]:
    """The token in force for section ``name`` (a mapping or None): the environment variable
    ``env`` if set (empty: unset), else the section's ``token``; and whether the file's token
    differs from the variable's, so is ignored. The variable wins, as a secret injected at
    deploy time overrides the checked-in file. Both follow one rule (``_header_value``) and
    both are checked, whichever is in force (a reload may change which one is). ``more_keys``:
    the section's other keys (read by the caller)."""
    from_env = environ.get(env) or None
    if from_env is not None:
        try:
            _header_value(from_env, f"environment variable {env}", _KEY_MATCHED)
        except ConfigError as exc:
            raise EnvironmentVariableError(exc) from None
    from_file = None
    if section is not None:
        data = _mapping(section, name)
        _check_keys(data, {"token", *more_keys}, name)
        if data.get("token") is not None:
            from_file = _header_value(data["token"], f"{name}.token", _KEY_MATCHED)
    if from_env is not None:
        return from_env, from_file is not None and from_file != from_env
    return from_file, False


_METRICS_SECONDS = ("loop_lag_interval_s", "loop_lag_warning_s")
# metrics.adapter_labels / metrics.tenant_labels (see MetricsConfig).
LABEL_MODES = ("all", "first_n", "listed", "none")
# Each label's mode key, its limit's key (first_n) and its names' key (listed).
_METRICS_LABELS = (
    ("adapter_labels", "adapter_label_limit", "adapter_label_names"),
    ("tenant_labels", "tenant_label_limit", "tenant_label_names"),
)
# The largest metrics.*_label_limit: 100,000 names (x 17 series per histogram) is far past
# what a Prometheus server scrapes from one target; beyond it a typo (an extra 0) is likelier.
MAX_LABEL_LIMIT = 100_000


def _label_names(value: object, key: str) -> tuple[str, ...]:
    """A ``metrics.*_label_names`` list: 1 to ``MAX_LABEL_LIMIT`` distinct non-empty names,
    none ``RESERVED_LABEL``."""
    names = _str_list(value, key)
    if not names:
        raise ConfigError("expected at least one name", key=key)
    if len(names) > MAX_LABEL_LIMIT:
        raise ConfigError(f"at most {MAX_LABEL_LIMIT} names, got {len(names)}", key=key)
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name == RESERVED_LABEL:
            raise ConfigError(
                f"{RESERVED_LABEL!r} is reserved: it is the value of every name not listed",
                key=f"{key}[{i}]",
            )
        if name in seen:
            raise ConfigError(f"duplicate name {name!r}", key=f"{key}[{i}]")
        seen.add(name)
    return names


def _label_modes(data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``metrics`` section's label modes, limits and names: a mode one of ``LABEL_MODES``,
    a limit an integer from 1 and set only with ``first_n``, names required with ``listed``
    and set only with it (the only modes that read them)."""
    out: dict[str, Any] = {}
    for mode_key, limit_key, names_key in _METRICS_LABELS:
        mode = "first_n"
        if mode_key in data:
            mode = _str(data[mode_key], f"metrics.{mode_key}")
            if mode not in LABEL_MODES:
                hint = misspelling(mode, LABEL_MODES)
                raise ConfigError(
                    f"expected one of {', '.join(repr(m) for m in LABEL_MODES)}, got {mode!r}"
                    + (f" ({hint})" if hint else ""),
                    key=f"metrics.{mode_key}",
                )
            out[mode_key] = mode
        for key, reader in ((limit_key, "first_n"), (names_key, "listed")):
            if key in data and mode != reader:
                raise ConfigError(
                    f"read only with metrics.{mode_key}: {reader} (it is {mode!r} here)",
                    key=f"metrics.{key}",
                )
        if limit_key in data:
            out[limit_key] = _int(
                data[limit_key], f"metrics.{limit_key}", minimum=1, maximum=MAX_LABEL_LIMIT
            )
        if mode == "listed":
            if names_key not in data:
                raise ConfigError(
                    f"required with metrics.{mode_key}: listed (the names that keep their own "
                    "label value)",
                    key=f"metrics.{names_key}",
                )
            out[names_key] = _label_names(data[names_key], f"metrics.{names_key}")
    return out


def _metrics(section: object, environ: Mapping[str, str]) -> MetricsConfig:
    more = (*_METRICS_SECONDS, *(k for keys in _METRICS_LABELS for k in keys))
    token, ignored = _token(section, "metrics", environ, METRICS_TOKEN_ENV, more)
    data = {} if section is None else _mapping(section, "metrics")
    kwargs: dict[str, Any] = {
        k: _seconds(data[k], f"metrics.{k}") for k in _METRICS_SECONDS if k in data
    }
    kwargs.update(_label_modes(data))
    return MetricsConfig(token=token, file_token_ignored=ignored, **kwargs)


_TOP_KEYS = {
    "base_model",
    "replicas",
    "adapters",
    "tenants",
    "routing",
    "limits",
    "poller",
    "server",
    "state",
    "admin",
    "metrics",
}


def config_from_mapping(data: object, *, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate a parsed config document and build the frozen :class:`GatewayConfig`. The
    environment variables that override the file's tokens (``LORAGATE_ADMIN_TOKEN``,
    ``LORAGATE_METRICS_TOKEN``) are read from ``environ`` (default: ``os.environ``) and checked
    with it, at start-up and at every reload."""
    env = os.environ if environ is None else environ
    if data is None:
        raise ConfigError("the config file is empty")
    top = _mapping(data, "")
    _check_keys(top, _TOP_KEYS, "")
    for required in ("base_model", "replicas"):
        if required not in top:
            raise ConfigError("missing required key", key=required)
    base_model = _str(top["base_model"], "base_model")
    tenants = _tenants(top.get("tenants") or [])
    kwargs: dict[str, Any] = {}
    if top.get("routing") is not None:
        kwargs["routing"] = _routing(top["routing"])
    if top.get("limits") is not None:
        kwargs["limits"] = _limits(top["limits"])
    if top.get("poller") is not None:
        kwargs["poller"] = _poller(top["poller"])
    if top.get("server") is not None:
        kwargs["server"] = _server(top["server"])
    if top.get("state") is not None:
        kwargs["state"] = _state(top["state"])
    token, ignored = _token(top.get("admin"), "admin", env, ADMIN_TOKEN_ENV)
    kwargs["admin"] = AdminConfig(token=token, file_token_ignored=ignored)
    kwargs["metrics"] = _metrics(top.get("metrics"), env)
    if "tombstone_ttl_s" in (top.get("state") or {}):  # the default (30 s) is far above
        _check_tombstone_ttl(kwargs["state"], kwargs.get("poller", PollerConfig()))
    return GatewayConfig(
        base_model=base_model,
        replicas=_replicas(top["replicas"]),
        adapters=_adapters(
            top.get("adapters") or [],
            base_model=base_model,
            tenants={t.name for t in tenants},
        ),
        tenants=tenants,
        **kwargs,
    )
