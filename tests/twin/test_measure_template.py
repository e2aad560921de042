"""``loragate twin measure``'s command template and adapter folders: what a user can get wrong is
one clear error naming the option (a missing or misspelt placeholder, an unsplittable line, a
folder that is not a peft adapter), and the server without LoRA is derived predictably."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loragate.core.errors import ConfigError
from loragate.twin.measure_launch import vllm_max_lora_rank
from loragate.twin.measure_template import (
    BASE_PLACEHOLDERS,
    PLACEHOLDERS,
    CommandTemplate,
    adapter_set,
)

GOOD = (
    "vllm serve meta-llama/Llama-3.1-8B --enable-lora --max-loras {max_loras} "
    "--max-cpu-loras={max_cpu_loras} --max-lora-rank {max_lora_rank} "
    "--max-num-seqs {max_num_seqs} --port {port} --compilation-config '{\"mode\": 0}'"
)


def _parse(text: str) -> CommandTemplate:
    return CommandTemplate.parse(text, option="--vllm-command", required=PLACEHOLDERS)


def test_a_good_template_is_filled_in_and_keeps_literal_braces() -> None:
    values = {"port": 8123, "max_loras": 4, "max_cpu_loras": 8, "max_lora_rank": 16}
    args = _parse(GOOD).render({**values, "max_num_seqs": 32})
    assert args == [
        "vllm", "serve", "meta-llama/Llama-3.1-8B", "--enable-lora", "--max-loras", "4",
        "--max-cpu-loras=8", "--max-lora-rank", "16", "--max-num-seqs", "32", "--port", "8123",
        "--compilation-config", '{"mode": 0}',
    ]  # fmt: skip


def test_the_server_without_lora_drops_enable_lora_and_the_lora_options() -> None:
    base = _parse(GOOD).without_lora()
    assert base.render({"port": 9, "max_num_seqs": 32}) == [
        "vllm", "serve", "meta-llama/Llama-3.1-8B", "--max-num-seqs", "32", "--port", "9",
        "--compilation-config", '{"mode": 0}',
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (GOOD.replace("--port {port}", "--port 8000"),
         "--vllm-command: the command lacks the placeholder(s) {port}"),
        (GOOD.replace(" --max-cpu-loras={max_cpu_loras}", "").replace("{max_num_seqs}", "32"),
         "lacks the placeholder(s) {max_cpu_loras}, {max_num_seqs}"),
        (GOOD.replace("{max_loras}", "{max_lora}"),
         "--vllm-command: unknown placeholder(s) {max_lora}; the placeholders are {port}, "
         "{max_loras}, {max_cpu_loras}, {max_lora_rank}, {max_num_seqs}"),
        ("vllm serve 'MODEL --port {port}", "--vllm-command: cannot split the command"),
        ("   ", "--vllm-command: the command is empty"),
    ],
)  # fmt: skip
def test_a_bad_template_is_one_error_naming_the_option(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(text)
    assert says in info.value.message
    assert info.value.param == "--vllm-command"


def test_a_lora_option_left_without_a_placeholder_asks_for_a_base_command() -> None:
    template = _parse(GOOD + " --lora-dtype bfloat16")
    with pytest.raises(ConfigError) as info:
        template.without_lora()
    assert "it keeps --lora-dtype" in info.value.message
    assert "give --vllm-base-command (placeholders {port}, {max_num_seqs})" in info.value.message


def test_the_base_command_needs_only_port_and_max_num_seqs() -> None:
    base = CommandTemplate.parse(
        "vllm serve M --port {port} --max-num-seqs {max_num_seqs}",
        option="--vllm-base-command",
        required=BASE_PLACEHOLDERS,
    )
    assert base.render({"port": 1, "max_num_seqs": 2})[-4:] == [
        "--port",
        "1",
        "--max-num-seqs",
        "2",
    ]
    with pytest.raises(ConfigError, match=r"--vllm-base-command: unknown placeholder\(s\)"):
        CommandTemplate.parse(
            "vllm serve M --port {port} --max-num-seqs {max_num_seqs} --max-loras {max_loras}",
            option="--vllm-base-command",
            required=BASE_PLACEHOLDERS,
        )


def _adapter(folder: Path, config: object) -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def test_adapters_are_grouped_by_their_rank(tmp_path: Path) -> None:
    a = _adapter(tmp_path / "a", {"r": 8})
    b = _adapter(tmp_path / "b", {"r": 16})
    c = _adapter(tmp_path / "c", {"r": 8})
    assert adapter_set([a, b, c]) == {
        8: [tmp_path / "a", tmp_path / "c"],
        16: [tmp_path / "b"],
    }


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: str(p / "nope"), "is not a folder"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "has no adapter_config.json"),
        (lambda p: _adapter(p / "x", {"lora_alpha": 16}), "has no positive integer rank 'r'"),
        (lambda p: _adapter(p / "x", {"r": 0}), "has no positive integer rank 'r'"),
    ],
)
def test_a_folder_that_is_not_an_adapter_is_named(tmp_path: Path, make: object, says: str) -> None:
    assert callable(make)
    folder = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        adapter_set([folder])
    assert says in info.value.message and info.value.param == "--adapter"


def test_no_adapter_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no adapter given"):
        adapter_set([])


@pytest.mark.parametrize(("rank", "max_rank"), [(1, 1), (4, 8), (8, 8), (12, 16), (300, 320)])
def test_max_lora_rank_is_a_value_vllm_accepts(rank: int, max_rank: int) -> None:
    assert vllm_max_lora_rank(rank) == max_rank
