"""LoRA adapter folders and the replica's adapter registry, as vLLM 0.32 behaves.

An adapter is a folder holding ``adapter_config.json`` (peft's format); its rank is ``r``.
A path without one gets vLLM's 404 ``Loading lora NAME failed: No adapter found for PATH`` (PATH
sanitised as vLLM sanitises messages: ``<path>`` for a path under /tmp, /home, ... or naming a
file); a config vLLM's engine cannot use, its 500 (``vllm_lora_load``). The registry is the API
server's name -> adapter map: loading registers a name, unloading only forgets it (0.32 never
evicts the engine's caches on unload): each new registration gets a new ``lora_int_id``, so a
name unloaded and loaded again is a new adapter to the engine, beside its old copy.
The filesystem resolver (``--resolver-dir``, vLLM's ``lora_filesystem_resolver``) registers an
unknown model name on first use when ``DIR/<name>`` is a LoRA folder whose
``base_model_name_or_path`` equals ``--model`` exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from loragate.twin.vllm_errors import VllmApiError, bad_request, invalid_user_input
from loragate.twin.vllm_lora_load import (
    LORA_NOT_ENABLED,
    add_lora_error,
    not_found,
    worker_failed,
)

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterFolder:
    """What the replica reads from an adapter folder."""

    path: str
    rank: int
    peft_type: str
    base_model_name_or_path: str | None


class AdapterFolderError(ValueError):
    """The folder has an ``adapter_config.json`` that cannot be used."""


def read_adapter_folder(path: str) -> AdapterFolder | None:
    """Read ``path/adapter_config.json``; None when ``path`` is not an adapter folder. A file
    that cannot be read as JSON (also: nested deeper than ``json`` recurses, an integer of more
    digits than Python converts) is an :class:`AdapterFolderError` saying why."""
    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not path or not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as fh:
            data: Any = json.load(fh)
    except RecursionError as exc:  # json's parser recurses per level: [[[[...
        raise AdapterFolderError(
            f"cannot read {ADAPTER_CONFIG}: nested too deep for a JSON parser"
        ) from exc
    except (OSError, ValueError) as exc:  # not UTF-8, not JSON, an int of over 4,300 digits
        reason = str(exc).split(";")[0]  # not Python's advice on sys.set_int_max_str_digits
        raise AdapterFolderError(f"cannot read {ADAPTER_CONFIG}: {reason}") from exc
    if not isinstance(data, dict):
        raise AdapterFolderError(f"{ADAPTER_CONFIG} is not a JSON object")
    rank = data.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterFolderError(f"{ADAPTER_CONFIG} needs a positive integer 'r', got {rank!r}")
    base = data.get("base_model_name_or_path")
    return AdapterFolder(
        path=path,
        rank=rank,
        peft_type=str(data.get("peft_type", "LORA")),
        base_model_name_or_path=base if isinstance(base, str) else None,
    )


def write_adapter_folder(
    path: str, *, rank: int, base_model_name_or_path: str | None = None
) -> str:
    """Create a minimal peft-like adapter folder (for tests, demos and docs)."""
    os.makedirs(path, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "base_model_name_or_path": base_model_name_or_path,
    }
    with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return path


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisteredAdapter:
    name: str
    path: str
    rank: int
    lora_int_id: int = 0  # vLLM's id of the registration (a new one per new registration)


class AdapterRegistry:
    """The replica's registered adapter names, in registration order (as ``/v1/models`` lists)."""

    def __init__(
        self,
        *,
        base_model_name: str,
        model: str,
        enable_lora: bool,
        max_lora_rank: int,
        resolver_dir: str | None = None,
    ) -> None:
        self._base = base_model_name
        self._model = model
        self._enable_lora = enable_lora
        self._max_rank = max_lora_rank
        self._resolver_dir = resolver_dir
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._last_id = 0  # vLLM's lora_id_counter

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def get(self, name: str) -> RegisteredAdapter | None:
        return self._adapters.get(name)

    def all(self) -> list[RegisteredAdapter]:
        return list(self._adapters.values())

    def load(self, name: str, path: str, *, load_inplace: bool = False) -> RegisteredAdapter:
        """``POST /v1/load_lora_adapter``: validate, then register ``name``."""
        self.check_request(name, path, load_inplace=load_inplace)
        try:
            loadable = self._check_loadable(name, path)
        except VllmApiError:
            if name not in self._adapters:  # vLLM took the next lora_int_id before add_lora
                self._last_id += 1
            raise
        adapter = self._with_id(loadable)
        self._adapters[name] = adapter
        return adapter

    def check_request(self, name: str, path: str, *, load_inplace: bool = False) -> None:
        """The API server's own checks of a load (its 400s), before it asks the engine."""
        if not name or not path:
            raise invalid_user_input("Both 'lora_name' and 'lora_path' must be provided.")
        if name in self._adapters and not load_inplace:
            raise invalid_user_input(
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True."
            )
        if name == self._base:
            raise invalid_user_input(
                f"The lora adapter '{name}' conflicts with a served base model."
            )

    def _with_id(self, adapter: RegisteredAdapter) -> RegisteredAdapter:
        """vLLM's ``lora_int_id``: the registered name's (in place), else the next one."""
        held = self._adapters.get(adapter.name)
        if held is not None:
            return dataclasses.replace(adapter, lora_int_id=held.lora_int_id)
        self._last_id += 1
        return dataclasses.replace(adapter, lora_int_id=self._last_id)

    def unload(self, name: str) -> None:
        """``POST /v1/unload_lora_adapter``: forget the name (the engine keeps its caches)."""
        if not name:
            raise invalid_user_input("'lora_name' needs to be provided to unload a LoRA adapter.")
        if self._adapters.pop(name, None) is None:
            raise VllmApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")

    def resolve(self, name: str) -> RegisteredAdapter | None:
        """The filesystem resolver: register ``resolver_dir/name`` if it qualifies.

        Returns None when nothing qualifies (the caller answers vLLM's model 404). Raises 400
        when a qualifying folder cannot be loaded (e.g. its rank exceeds ``max_lora_rank``).
        """
        if self._resolver_dir is None or not self._enable_lora or not _plain_name(name):
            return None
        path = os.path.join(self._resolver_dir, name)
        try:
            folder = read_adapter_folder(path)
        except AdapterFolderError:
            return None
        if (
            folder is None
            or folder.peft_type != "LORA"
            or folder.base_model_name_or_path != self._model
        ):
            return None
        try:
            adapter = self._check_loadable(name, path)
        except VllmApiError as exc:
            raise bad_request(f"LoRA adapter '{name}' was found but could not be loaded.") from exc
        adapter = self._with_id(adapter)
        self._adapters[name] = adapter
        return adapter

    def _check_loadable(self, name: str, path: str) -> RegisteredAdapter:
        if not self._enable_lora:  # vLLM's worker refuses every add_lora: its 500, any path
            raise worker_failed(LORA_NOT_ENABLED)
        # What vLLM's engine answers when its add_lora reads the folder (404, or its 500).
        error = add_lora_error(name, path, max_lora_rank=self._max_rank)
        if error is not None:
            raise error
        try:
            folder = read_adapter_folder(path)
        except AdapterFolderError as exc:  # (add_lora_error refuses what this cannot read)
            raise worker_failed(str(exc)) from exc
        if folder is None:
            raise not_found(name, path)
        return RegisteredAdapter(name=name, path=path, rank=folder.rank)


def _plain_name(name: str) -> bool:
    return bool(name) and name not in {".", ".."} and "/" not in name and os.sep not in name
