"""The admin and metrics tokens: in the file (``admin.token``, ``metrics.token``) or in the
environment (``LORAGATE_ADMIN_TOKEN``, ``LORAGATE_METRICS_TOKEN``), which wins, one rule for
both, checked when the file is read (start-up and every reload) with errors naming the key or
variable."""

from __future__ import annotations

from typing import Any

import pytest

from loragate.core.config import config_from_mapping
from loragate.core.errors import ConfigError

ADMIN_ENV = "LORAGATE_ADMIN_TOKEN"
METRICS_ENV = "LORAGATE_METRICS_TOKEN"

# What admin.token refuses (14ec46c): a key that no Authorization header can carry.
BAD_TOKENS = [
    ("s3cret\n", r"'\n' at position 6"),  # a secret file's trailing newline
    ("t\r\nX-Injected: 1", r"'\r' at position 1"),
    ("tök", r"'\xf6' at position 1"),
    (" s3cret", "starts or ends with a space"),
    ("   ", "non-empty string"),
]


def _doc(**sections: Any) -> dict[str, Any]:
    return {"base_model": "m", "replicas": ["http://h:1"], **sections}


@pytest.mark.parametrize("env", [ADMIN_ENV, METRICS_ENV])
@pytest.mark.parametrize(("value", "says"), BAD_TOKENS)
def test_a_token_in_the_environment_follows_the_files_rule_naming_the_variable(
    env: str, value: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(_doc(), environ={env: value})
    assert info.value.key == f"environment variable {env}"
    message = str(info.value)
    assert message.startswith(f"environment variable {env}: ") and says in message
    assert not value.strip() or value.strip() not in message  # never the token itself


@pytest.mark.parametrize("env", [ADMIN_ENV, METRICS_ENV])
def test_a_bad_variable_is_refused_even_while_the_files_token_is_in_force(env: str) -> None:
    """A reload of a file without the token would put the variable in force."""
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            _doc(admin={"token": "a"}, metrics={"token": "m"}), environ={env: "x\n"}
        )
    assert info.value.key == f"environment variable {env}"


def test_the_variables_stand_in_for_a_file_without_tokens() -> None:
    environ = {ADMIN_ENV: "from-env", METRICS_ENV: "scrape-env"}
    cfg = config_from_mapping(_doc(), environ=environ)
    assert (cfg.admin.token, cfg.metrics.token) == ("from-env", "scrape-env")
    cfg = config_from_mapping(_doc(admin={"token": None}, metrics={}), environ=environ)
    assert (cfg.admin.token, cfg.metrics.token) == ("from-env", "scrape-env")
    assert not cfg.admin.file_token_ignored and not cfg.metrics.file_token_ignored


def test_the_variables_win_over_the_files_tokens() -> None:
    """A secret injected at deploy time overrides the checked-in file (before, the file's
    token won, silently)."""
    doc = _doc(admin={"token": "file-a"}, metrics={"token": "file-m"})
    cfg = config_from_mapping(doc, environ={ADMIN_ENV: "env-a", METRICS_ENV: "env-m"})
    assert (cfg.admin.token, cfg.metrics.token) == ("env-a", "env-m")
    assert cfg.admin.file_token_ignored and cfg.metrics.file_token_ignored
    cfg = config_from_mapping(doc, environ={ADMIN_ENV: "file-a"})  # the same token: no warning
    assert (cfg.admin.token, cfg.metrics.token) == ("file-a", "file-m")
    assert not cfg.admin.file_token_ignored and not cfg.metrics.file_token_ignored
    cfg = config_from_mapping(doc, environ={})
    assert (cfg.admin.token, cfg.metrics.token) == ("file-a", "file-m")


@pytest.mark.parametrize(("section", "env"), [("admin", ADMIN_ENV), ("metrics", METRICS_ENV)])
def test_a_bad_files_token_is_refused_even_while_the_variable_wins(section: str, env: str) -> None:
    """A reload without the variable would put the file's token in force."""
    with pytest.raises(ConfigError) as info:
        config_from_mapping(_doc(**{section: {"token": "x\n"}}), environ={env: "good"})
    assert info.value.key == f"{section}.token"


def test_empty_variables_are_unset_and_metrics_stay_open_by_default() -> None:
    cfg = config_from_mapping(_doc(), environ={ADMIN_ENV: "", METRICS_ENV: ""})
    assert cfg.admin.token is None and cfg.metrics.token is None
    assert config_from_mapping(_doc(), environ={}).metrics.token is None


def test_the_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_ENV, "ok-token")
    monkeypatch.setenv(METRICS_ENV, "bad token\n")
    with pytest.raises(ConfigError) as info:
        config_from_mapping(_doc())
    assert info.value.key == f"environment variable {METRICS_ENV}"
    monkeypatch.delenv(METRICS_ENV)
    assert config_from_mapping(_doc()).admin.token == "ok-token"


@pytest.mark.parametrize(
    ("metrics", "key"),
    [
        ({"token": ""}, "metrics.token"),
        ({"token": 5}, "metrics.token"),
        ({"token": "t\r\nX: 1"}, "metrics.token"),
        ({"user": "x"}, "metrics.user"),
        ("open", "metrics"),
    ],
)
def test_a_bad_metrics_section_names_the_key(metrics: object, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(_doc(metrics=metrics), environ={})
    assert info.value.key == key
