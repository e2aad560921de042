"""Gateway config errors point into the file, as workload spec errors do (10eeaec):
``FILE:LINE:COLUMN: key: what is wrong``, for every section (routing's too), a missing key at
the mapping that lacks it; a misspelt key is reported first in its mapping, with the nearest
key as a hint. YAML nested deeper than any config needs is one such line, not PyYAML's
``RecursionError``. Before, the error named the key only (``limits.request_timeout_s: ...``)
and an unknown key listed every allowed one."""

from __future__ import annotations

from pathlib import Path

import pytest

from loragate.core.config import ADMIN_TOKEN_ENV
from loragate.core.errors import ConfigError
from loragate.gateway import load_config
from loragate.twin.adapters import write_adapter_folder
from loragate.workload.yaml_file import MAX_DEPTH

# Line numbers below are of this text (1-based).
CONFIG = """\
# a comment first: the document starts on line 2
base_model: tiny-llama
replicas:
  - id: a
    url: http://127.0.0.1:18101
    settings: {max_loras: 2}
  - http://127.0.0.1:18102
adapters:
  - {name: lora-0, path: /loras/lora-0, rank: 8, tenants: [acme]}
tenants:
  - name: acme
    api_keys: [sk-acme]
routing:
  scorers:
    - {name: load, weight: 1}
limits:
  request_timeout_s: 5
poller: {interval_s: 0.5}
server: {host: 127.0.0.1, port: 9000}
state:
  backend: memory
admin: {token: admin-t}
metrics: {token: metrics-t}
"""


def _error(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "gw.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return exc.value


def _message(tmp_path: Path, text: str) -> str:
    """The error's text after ``FILE:``, checked to be one line starting with the file."""
    text_of = str(_error(tmp_path, text))
    prefix = f"{tmp_path / 'gw.yaml'}:"
    assert text_of.startswith(prefix), text_of
    assert "\n" not in text_of
    return text_of[len(prefix) :]


def test_the_config_itself_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    assert load_config(path).limits.request_timeout_s == 5


def _hint(key: str, meant: str) -> str:
    name = key.rsplit(".", 1)[-1]
    return f"{key}: unknown key (is {name!r} a misspelling of {meant!r}?)"


# (old, new, the error after FILE:) for a misspelt key of every section
TYPOS = [
    ("limits:", "limts:", "16:1: " + _hint("limts", "limits")),
    ("    url: http", "    ulr: http", "5:5: " + _hint("replicas[0].ulr", "url")),
    ("{max_loras: 2}", "{max_lora: 2}",
     "6:16: " + _hint("replicas[0].settings.max_lora", "max_loras")),
    ("rank: 8", "rnak: 8", "9:41: " + _hint("adapters[0].rnak", "rank")),
    ("    api_keys:", "    api_key:", "12:5: " + _hint("tenants[0].api_key", "api_keys")),
    ("  request_timeout_s", "  request_timout_s",
     "17:3: " + _hint("limits.request_timout_s", "request_timeout_s")),
    ("{interval_s:", "{intervl_s:", "18:10: " + _hint("poller.intervl_s", "interval_s")),
    ("port: 9000", "prot: 9000", "19:27: " + _hint("server.prot", "port")),
    ("  backend: memory", "  backnd: memory", "21:3: " + _hint("state.backnd", "backend")),
    ("{token: admin-t}", "{tokn: admin-t}", "22:9: " + _hint("admin.tokn", "token")),
    ("{token: metrics-t}", "{toekn: metrics-t}", "23:11: " + _hint("metrics.toekn", "token")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "expected"), TYPOS, ids=[t[2].split(": ")[1] for t in TYPOS]
)
def test_a_misspelt_key_is_named_at_its_line_with_the_key_it_was_meant_to_be(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in CONFIG
    assert _message(tmp_path, CONFIG.replace(old, new, 1)) == expected


def test_a_misspelt_required_key_is_reported_as_misspelt_not_as_missing(tmp_path: Path) -> None:
    text = CONFIG.replace("base_model:", "base_modle:")
    assert _message(tmp_path, text) == "2:1: " + _hint("base_modle", "base_model")


ERRORS = [
    # a bad value: the line and column of its key
    ("request_timeout_s: 5", "request_timeout_s: -1",
     "17:3: limits.request_timeout_s: must be a positive number of seconds, got -1"),
    ("server: {host: 127.0.0.1, port: 9000}", "server: {host: 127.0.0.1, port: 70000}",
     "19:27: server.port: must be <= 65535, got 70000"),
    ("{max_loras: 2}", "{max_loras: 0}",
     "6:16: replicas[0].settings.max_loras: must be >= 1, got 0"),
    # a max_lora_rank vLLM 0.32 refuses to start with (its --max-lora-rank choices)
    ("{max_loras: 2}", "{max_loras: 2, max_lora_rank: 12}",
     "6:30: replicas[0].settings.max_lora_rank: must be one of vLLM's "
     "[1, 8, 16, 32, 64, 128, 256, 320, 512] (its --max-lora-rank choices), got 12"),
    # a list item given as a bare value: the item itself
    ("  - http://127.0.0.1:18102", "  - ftp://127.0.0.1:18102",
     "7:5: replicas[1].url: expected an http(s) URL, got 'ftp://127.0.0.1:18102'"),
    ("tenants: [acme]", "tenants: [acm]", "9:60: adapters[0].tenants[0]: unknown tenant 'acm'"),
    ("  - http://127.0.0.1:18102", "  - {id: a, url: 'http://127.0.0.1:18103'}",
     "7:6: replicas[1].id: duplicate replica id 'a'"),
    # missing: the mapping that lacks it
    ("    url: http://127.0.0.1:18101\n", "", "4:5: replicas[0].url: missing required key"),
    ("base_model: tiny-llama\n", "", "2:1: base_model: missing required key"),
    ("  backend: memory", "  backend: redis",
     "20:1: state.redis_url: required when state.backend is 'redis'"),
    # routing: the errors build_policy raises name the line of their key too
    ("{name: load, weight: 1}", "{name: load, weight: -1}",
     "15:20: routing.scorers[0].weight: must be >= 0, got -1"),
    ("{name: load,", "{name: lod,",
     "15:8: routing.scorers[0].name: unknown scorer 'lod' (is it a misspelling of 'load'?; "
     "known: "),
    ("{name: load, weight: 1}", "{name: load, wieght: 1}",
     "15:20: " + _hint("routing.scorers[0].wieght", "weight")),
    ("routing:\n  scorers:\n    - {name: load, weight: 1}\n", "routing: fastest\n",
     "13:1: routing: unknown policy 'fastest' (known: "),
]  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "expected"), ERRORS, ids=[e[2].split(": ")[1] for e in ERRORS]
)
def test_an_error_names_the_file_the_line_and_the_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in CONFIG
    assert _message(tmp_path, CONFIG.replace(old, new, 1)).startswith(expected)


def test_an_error_found_in_an_adapter_folder_names_the_line_of_its_rank(tmp_path: Path) -> None:
    folder = write_adapter_folder(str(tmp_path / "lora-0"), rank=16)
    text = CONFIG.replace("path: /loras/lora-0", f"path: '{folder}'")
    message = _message(tmp_path, text)
    assert message.startswith("9:")
    assert ": adapters[0].rank: rank 8 disagrees with r = 16" in message
    assert message.split(":")[1] == str(text.splitlines()[8].index("rank") + 1)


def test_an_error_the_400_and_the_log_carry_the_key_as_param(tmp_path: Path) -> None:
    err = _error(tmp_path, CONFIG.replace("request_timeout_s: 5", "request_timeout_s: x"))
    assert err.key == err.param == "limits.request_timeout_s"


def test_an_empty_file_is_named_without_a_line(tmp_path: Path) -> None:
    assert _message(tmp_path, "# nothing\n") == " the config file is empty"


def test_a_bad_token_in_the_environment_names_the_variable_not_a_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "tab\there")
    err = _error(tmp_path, CONFIG.replace("admin: {token: admin-t}\n", ""))
    assert str(err).startswith(f"environment variable {ADMIN_TOKEN_ENV}: character '\\t' ")
    assert err.param == f"environment variable {ADMIN_TOKEN_ENV}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # PyYAML's composer recursed per level: a RecursionError and a traceback of ~3,000 lines
        ("base_model: m\nreplicas: " + "[" * 5000 + "]" * 5000 + "\n",
         f"2:{11 + MAX_DEPTH - 1}: nested more than {MAX_DEPTH} levels deep"),
        # inside routing: refused where it gets too deep, before any routing check reads it
        ("base_model: m\nreplicas: [http://h:1]\nrouting: {policy: round_robin, x: "
         + "[" * 300 + "]" * 300 + "}\n", f"3:{35 + MAX_DEPTH - 2}: nested more than"),
        # aliases bring their anchor's depth with them
        ("base_model: m\nreplicas: [http://h:1]\nrouting: {policy: round_robin, x: &a "
         + "[" * 60 + "]" * 60 + ", y: " + "[" * 45 + "*a" + "]" * 45 + "}\n",
         "3:"),
    ],
    ids=["replicas", "routing", "alias"],
)  # fmt: skip
def test_yaml_nested_too_deep_is_one_line_naming_where(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = _message(tmp_path, text)
    assert message.startswith(expected), message
    assert f"more than {MAX_DEPTH} levels deep" in message


def test_a_chain_of_aliases_too_deep_is_refused_at_the_alias(tmp_path: Path) -> None:
    """Each anchor 50 levels deep, each holding the one before: PyYAML composed it, and the
    validator's own recursion over the routing section (``core.config._freeze``) raised
    RecursionError."""
    anchors = ["x0: &a0 " + "[" * 50 + "]" * 50]
    anchors += [f"x{i}: &a{i} " + "[" * 50 + f"*a{i - 1}" + "]" * 50 for i in range(1, 20)]
    text = "base_model: m\nreplicas: [http://h:1]\nrouting:\n  policy: round_robin\n"
    text += "".join(f"  {anchor}\n" for anchor in anchors)
    assert _message(tmp_path, text).startswith(
        f"6:61: alias *a0 nests the document more than {MAX_DEPTH} levels deep"
    )


def test_a_scalar_yaml_cannot_build_is_named_at_its_line(tmp_path: Path) -> None:
    """PyYAML reads ``2024-13-01`` as a date and raised ValueError; an integer of more digits
    than Python converts, too."""
    assert _message(tmp_path, CONFIG.replace("tiny-llama", "2024-13-01")) == (
        "2:13: cannot read '2024-13-01' as a YAML timestamp: month must be in 1..12"
    )
    huge = CONFIG.replace("request_timeout_s: 5", "request_timeout_s: " + "9" * 5000)
    assert _message(tmp_path, huge).startswith(
        "17:22: cannot read '99999999999999999999'... (5000 characters) as a YAML int: Exceeds"
    )
