from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from loragate.twin.adapters import AdapterRegistry, read_adapter_folder
from loragate.twin.vllm_errors import VllmApiError

MakeAdapterDir = Callable[..., str]

BASE = "tiny-llama"
MODEL = "/models/tiny-llama"


def registry(resolver_dir: str | None = None, *, enable_lora: bool = True) -> AdapterRegistry:
    return AdapterRegistry(
        base_model_name=BASE,
        model=MODEL,
        enable_lora=enable_lora,
        max_lora_rank=16,
        resolver_dir=resolver_dir,
    )


def error_of(fn: object, *args: object, **kwargs: object) -> VllmApiError:
    with pytest.raises(VllmApiError) as exc:
        fn(*args, **kwargs)  # type: ignore[operator]
    return exc.value


def test_reads_rank_from_r(adapter_dir: MakeAdapterDir) -> None:
    folder = read_adapter_folder(adapter_dir("a", 16))
    assert folder is not None and folder.rank == 16 and folder.peft_type == "LORA"


def test_load_cases_like_vllm(adapter_dir: MakeAdapterDir, tmp_path: Path) -> None:
    reg = registry()
    path = adapter_dir("lora-0", 8)
    assert reg.load("lora-0", path).rank == 8
    err = error_of(reg.load, "lora-0", path)
    assert (err.status, err.err_type) == (400, "InvalidUserInput")
    assert "has already been loaded" in err.message and "load_inplace" in err.message
    assert reg.load("lora-0", path, load_inplace=True).name == "lora-0"
    assert reg.load("lora-0-alias", path).path == path  # same path, second name
    err = error_of(reg.load, "nope", str(tmp_path / "does-not-exist"))
    assert (err.status, err.err_type) == (404, "NotFoundError")
    assert err.message == "Loading lora nope failed: No adapter found for <path>"
    (tmp_path / "model").mkdir()
    assert error_of(reg.load, "notlora", str(tmp_path / "model")).status == 404
    err = error_of(reg.load, BASE, path)
    assert err.message == f"The lora adapter '{BASE}' conflicts with a served base model."
    err = error_of(reg.load, "x", "")
    assert err.message == "Both 'lora_name' and 'lora_path' must be provided."
    err = error_of(reg.load, "big", adapter_dir("big", 32))
    assert (err.status, err.err_type) == (500, "InternalServerError")
    assert err.message == (
        "Call to add_lora method failed: Worker failed with error 'LoRA rank 32 is greater "
        "than max_lora_rank 16.', please check the stack trace above for the root cause"
    )  # vLLM 0.32's words (measured)
    assert [a.name for a in reg.all()] == ["lora-0", "lora-0-alias"]


def test_broken_adapter_config_is_vllms_500(adapter_dir: MakeAdapterDir) -> None:
    path = adapter_dir("broken", 8)
    Path(path, "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    err = error_of(registry().load, "broken", path)
    assert err.status == 500 and "Missing required configuration fields: {'r', " in err.message


def test_unload_only_forgets_the_name(adapter_dir: MakeAdapterDir) -> None:
    reg = registry()
    reg.load("lora-0", adapter_dir("lora-0"))
    reg.unload("lora-0")
    assert "lora-0" not in reg
    err = error_of(reg.unload, "lora-0")
    assert (err.status, err.message) == (404, "The lora adapter 'lora-0' cannot be found.")


def test_lora_disabled_refuses_loads(adapter_dir: MakeAdapterDir) -> None:
    """vLLM 0.32 without --enable-lora: its worker's 500, for a real adapter and a path that
    does not exist alike (bench/vllm_cpu/lora_off_transcript.md)."""
    reg = registry(enable_lora=False)
    for name, path in (("a", adapter_dir("a")), ("missing", "/nonexistent/missing")):
        err = error_of(reg.load, name, path)
        assert (err.status, err.err_type, err.message) == (
            500,
            "InternalServerError",
            "Call to add_lora method failed: Worker failed with error 'LoRA is not enabled. "
            "Use --enable-lora to enable LoRA.', please check the stack trace above for the "
            "root cause",
        )
    assert "a" not in reg


def test_resolver_checks_base_model_and_peft_type(
    adapter_dir: MakeAdapterDir, tmp_path: Path
) -> None:
    root = tmp_path / "loras"
    adapter_dir("lora-4", 8, base_model_name_or_path=MODEL)
    adapter_dir("lora-3-mismatch", 8, base_model_name_or_path=BASE)  # served name, not --model
    adapter_dir("too-big", 64, base_model_name_or_path=MODEL)
    reg = registry(str(root))
    resolved = reg.resolve("lora-4")
    assert resolved is not None and resolved.path == str(root / "lora-4")
    assert "lora-4" in reg
    assert reg.resolve("lora-3-mismatch") is None
    assert reg.resolve("not-a-dir") is None
    assert reg.resolve("../loras") is None
    err = error_of(reg.resolve, "too-big")
    assert err.status == 400 and "was found but could not be loaded" in err.message
    assert registry(None).resolve("lora-4") is None
