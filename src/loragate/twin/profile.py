"""Performance profiles of one vLLM replica: step-time model, LoRA overhead, load costs, KV memory.

A profile is a small YAML file (see ``profiles/*.yaml``). Every formula of the twin's cost model
lives in the methods of :class:`PerformanceProfile` and nowhere else.

Step time (ms) of one engine step, B = requests in the batch, A = distinct adapters in the batch::

    t = t_sched + (decode_intercept_ms + decode_ms_per_seq·B + prefill_ms_per_token·P) · f_lora
    f_lora = (pct_per_adapter·A + intercept_pct + pct_per_rank·max_rank) / 100   (LoRA enabled)
    f_lora = 1                                                                  (LoRA disabled)
    + LoRA extras (``LoraModel``: per token, per adapter, per LoRA slot)        (LoRA enabled)
    t_sched = sched_intercept_ms + sched_ms_per_running·B + sched_ms_per_waiting·min(W, cap)

This is the model of Agulló et al., arXiv 2508.08343 (``(c1·B + c2)·(k1·A + k2)/100``), extended
with an optional prefill term, an optional rank term and a scheduler term. With LoRA enabled and
no adapter in the batch (A = 0, base-model requests only) the factor is ``intercept_pct/100``:
vLLM runs the LoRA kernels for every batch once ``--enable-lora`` is set; ``zero_adapter_pct``
overrides it when a calibration measured that case. Load costs (CPU->GPU, disk->CPU) are added
to the step by the engine, which calls :meth:`cpu_to_gpu_load_s` / :meth:`disk_to_cpu_load_s`.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from loragate.core.config import unknown_key
from loragate.core.errors import ConfigError
from loragate.workload.yaml_file import load_yaml_with_lines, naming_file, read_text_file

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True, slots=True, kw_only=True)
class StepModel:
    """Compute part of a step (before the LoRA factor), in ms."""

    decode_intercept_ms: float
    decode_ms_per_seq: float
    prefill_ms_per_token: float = 0.0
    # Optional (calibrated profiles, see twin/calibrate.py). ``knee_seqs``: the per-token cost
    # applies only above this many effective tokens (decode is weight-bandwidth bound below).
    # ``ms_per_context_token``: attention cost per KV token of the running requests, which are
    # ``context_tokens_per_seq`` long on average (a workload property: ``specialize``).
    knee_seqs: float = 0.0
    ms_per_context_token: float = 0.0
    context_tokens_per_seq: float = 0.0


# The LoRA kernels tile the rank dimension no finer than this (``LoraModel.ms_per_slot``).
SLOT_RANK_FLOOR = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraModel:
    """LoRA overhead factor in percent: ``pct_per_adapter·A + intercept_pct + pct_per_rank·r``."""

    pct_per_adapter: float = 0.0
    intercept_pct: float = 100.0
    pct_per_rank: float = 0.0
    zero_adapter_pct: float | None = None
    # Optional additive LoRA cost (ms), added after the factor: ``extra_intercept_ms +
    # (extra_ms_per_token + extra_ms_per_token_per_slot * max_loras) * T + extra_ms_per_adapter
    # * A`` with T = B + w * P. The per-slot term models the triton kernels' programs per (token
    # tile, LoRA slot); ``max_loras`` is the engine's slot count (``specialize``; the
    # calibration's by default). ``prefill_token_weight`` is w: ``None`` weighs a prefill token
    # like the base step does (prefill_ms_per_token / decode_ms_per_seq); 1.0 counts every
    # scheduled token (the LoRA kernels' grid and work are per token, decode or prefill alike).
    extra_intercept_ms: float = 0.0
    extra_ms_per_token: float = 0.0
    extra_ms_per_token_per_slot: float = 0.0
    extra_ms_per_adapter: float = 0.0
    max_loras: int = 0
    prefill_token_weight: float | None = None
    # Optional per-step cost of every LoRA slot, whatever the batch holds (ms): ``max_loras *
    # (ms_per_slot + ms_per_slot_per_rank * max(max_lora_rank, slot_rank_floor))``. The triton
    # shrink/expand kernels launch programs for every slot of the stacked LoRA weights, and
    # those of empty slots still cost a launch and an early exit; the weights' rank dimension
    # is padded to ``max_lora_rank`` and tiled no finer than ``slot_rank_floor`` (16: the
    # smallest ``tl.dot`` block), so ranks 8 and 16 cost the same. Calibrated from the
    # single-request ITLs of the R7 sweep over (max_loras, max_lora_rank); ``max_lora_rank``
    # is the engine's (``specialize``).
    ms_per_slot: float = 0.0
    ms_per_slot_per_rank: float = 0.0
    slot_rank_floor: int = SLOT_RANK_FLOOR
    max_lora_rank: int = 0

    def slot_ms(self) -> float:
        """The per-step cost of the engine's LoRA slots (ms; 0 without calibrated terms)."""
        if not (self.ms_per_slot or self.ms_per_slot_per_rank) or self.max_loras <= 0:
            return 0.0
        rank = max(self.max_lora_rank, self.slot_rank_floor)
        return self.max_loras * (self.ms_per_slot + self.ms_per_slot_per_rank * rank)


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerModel:
    """CPU-side scheduling overhead per step, in ms, linear in queue sizes."""

    intercept_ms: float = 0.0
    ms_per_running: float = 0.0
    ms_per_waiting: float = 0.0
    max_waiting: int | None = None  # the waiting term saturates at this queue length
    # Optional: per-waiting-request cost while every LoRA slot is taken (A >= lora.max_loras):
    # vLLM 0.8.5's scheduler then walks the whole waiting queue, skipping other adapters.
    ms_per_waiting_slots_full: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RankCost:
    """A cost in ms as a function of adapter rank: a table (piecewise linear) or a line."""

    intercept_ms: float = 0.0
    ms_per_rank: float = 0.0
    table: tuple[tuple[int, float], ...] = ()  # sorted (rank, ms) pairs; used when non-empty

    def ms(self, rank: int) -> float:
        t = self.table
        if not t:
            return max(0.0, self.intercept_ms + self.ms_per_rank * rank)
        ranks = [r for r, _ in t]
        i = bisect.bisect_left(ranks, rank)
        if i < len(t) and t[i][0] == rank:
            return t[i][1]
        if i == 0:
            return t[0][1]
        if i == len(t):
            return t[-1][1]
        (r0, m0), (r1, m1) = t[i - 1], t[i]
        return m0 + (m1 - m0) * (rank - r0) / (r1 - r0)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadModel:
    cpu_to_gpu: RankCost = field(default_factory=RankCost)
    disk_to_cpu: RankCost = field(default_factory=RankCost)
    # Optional: extra CPU->GPU time when the adapter's rank is below the engine's
    # max_lora_rank (its weights are padded into the slot); ``max_lora_rank``: ``specialize``.
    cpu_to_gpu_pad_ms: float = 0.0
    max_lora_rank: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class KvModel:
    """KV capacity in tokens: ``kv0_tokens - tokens_per_slot_rank·max_loras·max_lora_rank``.

    ``table`` holds measured capacities keyed by (max_loras, max_lora_rank); an entry of ``None``
    (server did not start at the model's default max_model_len) falls back to the line.
    ``no_lora_tokens`` is the capacity without ``--enable-lora`` (default ``kv0_tokens``).
    """

    kv0_tokens: int
    tokens_per_slot_rank: float = 0.0
    no_lora_tokens: int | None = None
    table: tuple[tuple[int, int, int | None], ...] = ()
    tokens_per_slot: float = 0.0  # optional rank-independent cost of one slot


@dataclass(frozen=True, slots=True, kw_only=True)
class PerformanceProfile:
    name: str
    description: str = ""
    source: str = ""
    step: StepModel
    lora: LoraModel = field(default_factory=LoraModel)
    scheduler: SchedulerModel = field(default_factory=SchedulerModel)
    loading: LoadModel = field(default_factory=LoadModel)
    kv: KvModel
    fit: dict[str, Any] = field(default_factory=dict)  # free-form calibration metadata

    # --- the cost model -----------------------------------------------------------------------

    def step_time_s(
        self,
        *,
        batch_size: int,
        distinct_adapters: int,
        prefill_tokens: int,
        decode_tokens: int,
        max_rank_in_batch: int,
        num_waiting: int,
        lora_enabled: bool,
    ) -> float:
        """Duration of one engine step in seconds (without adapter load times)."""
        del decode_tokens  # decode cost is per sequence in the batch (the paper's regressor)
        s = self.step
        linear_ms = s.decode_ms_per_seq * batch_size + s.prefill_ms_per_token * prefill_tokens
        if s.knee_seqs:
            linear_ms = max(0.0, linear_ms - s.decode_ms_per_seq * s.knee_seqs)
        compute_ms = s.decode_intercept_ms + linear_ms
        if s.ms_per_context_token:
            compute_ms += s.ms_per_context_token * s.context_tokens_per_seq * batch_size
        if lora_enabled:
            lo = self.lora
            if distinct_adapters == 0 and lo.zero_adapter_pct is not None:
                pct = lo.zero_adapter_pct
            else:
                pct = (
                    lo.pct_per_adapter * distinct_adapters
                    + lo.intercept_pct
                    + lo.pct_per_rank * max_rank_in_batch
                )
            compute_ms *= pct / 100.0
            compute_ms += lo.slot_ms()
            if (
                lo.extra_ms_per_token
                or lo.extra_ms_per_token_per_slot
                or lo.extra_intercept_ms
                or lo.extra_ms_per_adapter
            ):
                per_seq = s.decode_ms_per_seq
                weight = lo.prefill_token_weight
                if weight is None:
                    weight = s.prefill_ms_per_token / per_seq if per_seq else 1.0
                tokens = batch_size + weight * prefill_tokens
                per_token = lo.extra_ms_per_token + lo.extra_ms_per_token_per_slot * lo.max_loras
                compute_ms += (
                    lo.extra_intercept_ms
                    + per_token * tokens
                    + lo.extra_ms_per_adapter * distinct_adapters
                )
        sc = self.scheduler
        waiting = num_waiting if sc.max_waiting is None else min(num_waiting, sc.max_waiting)
        per_waiting = sc.ms_per_waiting
        if (
            sc.ms_per_waiting_slots_full is not None
            and lora_enabled
            and 0 < self.lora.max_loras <= distinct_adapters
        ):
            per_waiting = sc.ms_per_waiting_slots_full
        sched_ms = sc.intercept_ms + sc.ms_per_running * batch_size + per_waiting * waiting
        return max(compute_ms + sched_ms, 1e-6) / 1000.0

    def cpu_to_gpu_load_s(self, rank: int) -> float:
        """Time to copy an adapter of ``rank`` from the CPU cache into a GPU slot."""
        ld = self.loading
        pad = ld.cpu_to_gpu_pad_ms if rank < ld.max_lora_rank else 0.0
        return (ld.cpu_to_gpu.ms(rank) + pad) / 1000.0

    def disk_to_cpu_load_s(self, rank: int) -> float:
        """Time to read an adapter of ``rank`` from disk into the CPU cache."""
        return self.loading.disk_to_cpu.ms(rank) / 1000.0

    def kv_capacity_tokens(self, *, max_loras: int, max_lora_rank: int, lora_enabled: bool) -> int:
        """KV-cache capacity in tokens for these LoRA settings (0 if nothing is left)."""
        kv = self.kv
        if not lora_enabled:
            return kv.no_lora_tokens if kv.no_lora_tokens is not None else kv.kv0_tokens
        for slots, rank, tokens in kv.table:
            if slots == max_loras and rank == max_lora_rank and tokens is not None:
                return tokens
        return max(
            0,
            int(
                kv.kv0_tokens
                - kv.tokens_per_slot_rank * max_loras * max_lora_rank
                - kv.tokens_per_slot * max_loras
            ),
        )

    def specialize(
        self,
        *,
        max_loras: int | None = None,
        max_lora_rank: int | None = None,
        context_tokens_per_seq: float | None = None,
    ) -> PerformanceProfile:
        """A copy bound to an engine's settings / a workload's mean context (optional terms)."""
        p = self
        if max_loras is not None:
            p = replace(p, lora=replace(p.lora, max_loras=max_loras))
        if max_lora_rank is not None:
            p = replace(
                p,
                loading=replace(p.loading, max_lora_rank=max_lora_rank),
                lora=replace(p.lora, max_lora_rank=max_lora_rank),
            )
        if context_tokens_per_seq is not None:
            p = replace(p, step=replace(p.step, context_tokens_per_seq=context_tokens_per_seq))
        return p


# --- YAML ---------------------------------------------------------------------------------------


def _check_fields(data: dict[str, Any], known: set[str], key: str) -> None:
    """The first key of ``data`` not in ``known`` is an error naming it (``step.itl_ms: unknown
    key (is 'itl_ms' a misspelling of ...?)``), so a file's reader can point at its line."""
    for name in data:
        if name not in known:
            raise ConfigError(
                unknown_key(str(name), known), key=f"{key}.{name}" if key else str(name)
            )


def _section(raw: dict[str, Any], key: str, cls: type[Any], required: bool) -> Any:
    data = raw.get(key)
    if data is None:
        if required:
            raise ConfigError("missing section", key=key)
        return cls()
    if not isinstance(data, dict):
        raise ConfigError("must be a mapping", key=key)
    names = {f.name for f in fields(cls)}
    _check_fields(data, names, key)
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(str(exc), key=key) from exc


def _rank_cost(data: Any, key: str) -> RankCost:
    if data is None:
        return RankCost()
    if not isinstance(data, dict):
        raise ConfigError("must be a mapping (intercept_ms/ms_per_rank or table)", key=key)
    _check_fields(data, {"intercept_ms", "ms_per_rank", "table"}, key)
    table_raw = data.get("table") or {}
    if not isinstance(table_raw, dict):
        raise ConfigError("table must map rank -> ms", key=f"{key}.table")
    table = tuple(sorted((int(r), float(ms)) for r, ms in table_raw.items()))
    return RankCost(
        intercept_ms=float(data.get("intercept_ms", 0.0)),
        ms_per_rank=float(data.get("ms_per_rank", 0.0)),
        table=table,
    )


def _kv(data: Any) -> KvModel:
    if not isinstance(data, dict) or "kv0_tokens" not in data:
        raise ConfigError("missing section or kv0_tokens", key="kv")
    _check_fields(data, {f.name for f in fields(KvModel)}, "kv")
    rows: list[tuple[int, int, int | None]] = []
    for row in data.get("table") or []:
        if not isinstance(row, list | tuple) or len(row) != 3:
            raise ConfigError("rows are [max_loras, max_lora_rank, kv_tokens|null]", key="kv.table")
        rows.append((int(row[0]), int(row[1]), None if row[2] is None else int(row[2])))
    no_lora = data.get("no_lora_tokens")
    return KvModel(
        kv0_tokens=int(data["kv0_tokens"]),
        tokens_per_slot_rank=float(data.get("tokens_per_slot_rank", 0.0)),
        no_lora_tokens=None if no_lora is None else int(no_lora),
        table=tuple(rows),
        tokens_per_slot=float(data.get("tokens_per_slot", 0.0)),
    )


def profile_from_dict(raw: dict[str, Any]) -> PerformanceProfile:
    _check_fields(raw, {f.name for f in fields(PerformanceProfile)}, "")
    if not raw.get("name"):
        raise ConfigError("missing", key="name")
    loading_raw = raw.get("loading") or {}
    if not isinstance(loading_raw, dict):
        raise ConfigError("must be a mapping", key="loading")
    _check_fields(
        loading_raw,
        {"cpu_to_gpu_ms", "disk_to_cpu_ms", "cpu_to_gpu_pad_ms", "max_lora_rank"},
        "loading",
    )
    fit = raw.get("fit") or {}
    if not isinstance(fit, dict):
        raise ConfigError("must be a mapping", key="fit")
    return PerformanceProfile(
        name=str(raw["name"]),
        description=str(raw.get("description", "")),
        source=str(raw.get("source", "")),
        step=_section(raw, "step", StepModel, required=True),
        lora=_section(raw, "lora", LoraModel, required=False),
        scheduler=_section(raw, "scheduler", SchedulerModel, required=False),
        loading=LoadModel(
            cpu_to_gpu=_rank_cost(loading_raw.get("cpu_to_gpu_ms"), "loading.cpu_to_gpu_ms"),
            disk_to_cpu=_rank_cost(loading_raw.get("disk_to_cpu_ms"), "loading.disk_to_cpu_ms"),
            cpu_to_gpu_pad_ms=float(loading_raw.get("cpu_to_gpu_pad_ms", 0.0)),
            max_lora_rank=int(loading_raw.get("max_lora_rank", 0)),
        ),
        kv=_kv(raw.get("kv")),
        fit=dict(fit),
    )


def _rank_cost_dict(rc: RankCost) -> dict[str, Any]:
    if rc.table:
        return {"table": {r: ms for r, ms in rc.table}}
    return {"intercept_ms": rc.intercept_ms, "ms_per_rank": rc.ms_per_rank}


def profile_to_dict(p: PerformanceProfile) -> dict[str, Any]:
    return {
        "name": p.name,
        "description": p.description,
        "source": p.source,
        "step": asdict(p.step),
        "lora": asdict(p.lora),
        "scheduler": asdict(p.scheduler),
        "loading": {
            "cpu_to_gpu_ms": _rank_cost_dict(p.loading.cpu_to_gpu),
            "disk_to_cpu_ms": _rank_cost_dict(p.loading.disk_to_cpu),
            **(
                {
                    "cpu_to_gpu_pad_ms": p.loading.cpu_to_gpu_pad_ms,
                    "max_lora_rank": p.loading.max_lora_rank,
                }
                if p.loading.cpu_to_gpu_pad_ms or p.loading.max_lora_rank
                else {}
            ),
        },
        "kv": {
            "kv0_tokens": p.kv.kv0_tokens,
            "tokens_per_slot_rank": p.kv.tokens_per_slot_rank,
            "no_lora_tokens": p.kv.no_lora_tokens,
            "table": [list(row) for row in p.kv.table],
            **({"tokens_per_slot": p.kv.tokens_per_slot} if p.kv.tokens_per_slot else {}),
        },
        "fit": dict(p.fit),
    }


def list_profiles() -> list[str]:
    """Names of the built-in profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> PerformanceProfile:
    """Load a built-in profile by name, or a profile YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = PROFILES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown profile {str(name_or_path)!r}; built-in: {', '.join(list_profiles())}",
                key="profile",
            )
    # Read as every loragate file is (workload.yaml_file): each error one line naming the
    # file, and the line and column of its key (``p.yaml:3:1: stepp: unknown key (is 'stepp'
    # a misspelling of 'step'?)``).
    source = str(path)
    try:
        text = read_text_file(path, "profile file")
    except ConfigError as exc:
        raise ConfigError(str(exc), key="profile") from exc
    raw, lines = load_yaml_with_lines(text, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile must be a YAML mapping", key="profile")
    with naming_file(source, lines):
        return profile_from_dict(raw)


def dump_profile(p: PerformanceProfile, path: str | Path) -> None:
    """Write ``p`` as YAML (round-trips through :func:`load_profile`)."""
    Path(path).write_text(yaml.safe_dump(profile_to_dict(p), sort_keys=False))
