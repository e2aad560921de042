"""Config values that Python's own parsers choke on are refused as bad config, naming the key,
not raised as whatever the parser raises.

Before, each of these escaped ``config_from_mapping`` (and ``load_config``) as a ``ValueError``
or ``OverflowError``: ``loragate serve`` printed a traceback, a reload counted it ``error``
instead of ``rejected`` (a 500 from ``POST /admin/reload``), and an adapter path with a NUL
made ``POST /admin/adapters`` a 500. A URL host that ``urlsplit`` takes but aiohttp's URLs
refuse (``[::1]x``, a backslash) passed, and failed later, when the poller first asked the
replica.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loragate.core.config import config_from_mapping
from loragate.core.errors import ConfigError
from loragate.gateway import load_config

BASE: dict[str, Any] = {"base_model": "m", "replicas": ["http://127.0.0.1:28101"]}


def _load(**sections: Any) -> None:
    config_from_mapping({**BASE, **sections}, environ={})


def _adapter(path: str) -> dict[str, Any]:
    return {"adapters": [{"name": "lora-0", "path": "/loras/ok"}, {"name": "b", "path": path}]}


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("~\0nobody/lora-0", "character '\\x00' at position 1"),  # expanduser's ValueError
        ("/a\0b", "character '\\x00' at position 2"),  # os.stat's ValueError
        ("/loras/a\nWARNING forged", "character '\\n' at position 8"),
        ("/loras/\x7f", "character '\\x7f' at position 7"),
        ("/loras/\x85", "character '\\x85' at position 7"),  # C1 (NEL)
        ("~\ud800", "character '\\ud800' at position 1"),  # a lone surrogate: no UTF-8
    ],
)
def test_an_adapter_path_with_a_control_character_is_refused(path: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(**_adapter(path))
    assert info.value.key == "adapters[1].path"
    assert str(info.value).startswith(f"adapters[1].path: {says} is not allowed in an adapter path")
    assert path not in str(info.value)  # named by position, not echoed


@pytest.mark.parametrize("path", ["/loras/ é-ü", "~/loras/lora-0", "org/hub-id", "a\u2028b"])
def test_other_adapter_paths_are_taken(path: str) -> None:
    _load(**_adapter(path))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://[::1", "not a URL: Invalid IPv6 URL in 'http://[::1'"),
        ("http://[::1/v1", "not a URL: Invalid IPv6 URL"),
        ("http://[host]:8000", "not a URL: 'host' does not appear to be an IPv4 or IPv6 address"),
        ("http://[::1]x:8000", "bad host in 'http://[::1]x:8000'"),
        ("http://x[::1]:8000", "bad host in 'http://x[::1]:8000'"),
        ("http://[::1]]:8000", "bad host in"),
        ("http://vllm\\a:8000", "bad host in"),
    ],
)
def test_a_replica_url_urlsplit_or_aiohttp_cannot_read_is_refused(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(replicas=["http://127.0.0.1:28101", {"id": "b", "url": url}])
    assert info.value.key == "replicas[1].url"
    assert says in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://[::1]:8000", "http://[::1]", "https://[fe80::1%25eth0]:8443/v", "http://a_b"]
)
def test_replica_urls_with_brackets_done_right_are_taken(url: str) -> None:
    _load(replicas=[url])


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://[::1", "not a Redis URL: Invalid IPv6 URL"),
        ("redis://[redis]:6379/0", "not a Redis URL: 'redis' does not appear"),
        ("redis://h:99999/0", "not a Redis URL: Port out of range 0-65535"),
        ("redis://h:63x9/0", "not a Redis URL: Port could not be cast to integer value"),
    ],
)
def test_a_redis_url_that_cannot_be_read_is_refused(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(state={"backend": "redis", "redis_url": url})
    assert info.value.key == "state.redis_url"
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("section", "name"),
    [
        ("limits", "request_timeout_s"),
        ("poller", "interval_s"),
        ("poller", "adapter_refusal_ttl_s"),
        ("state", "lease_ttl_s"),
        ("server", "shutdown_timeout_s"),
    ],
)
def test_seconds_beyond_any_float_are_refused(section: str, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(**{section: {name: 10**400}})  # math.isfinite raised OverflowError
    assert info.value.key == f"{section}.{name}"
    assert str(info.value).endswith("got an integer too large for a number of seconds")


def test_a_config_file_names_the_line_of_a_bad_path_and_url(tmp_path: Path) -> None:
    gw = tmp_path / "gw.yaml"
    gw.write_text(
        'base_model: m\nreplicas: ["http://127.0.0.1:28101"]\nadapters:\n'
        '  - {name: lora-0, path: "~\\0nobody/lora-0"}\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:  # before: ValueError: embedded null byte
        load_config(gw)
    assert str(info.value).startswith(f"{gw}:4:20: adapters[0].path: character '\\x00' at")
    gw.write_text('base_model: m\nreplicas:\n  - "http://[::1"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:  # before: ValueError: Invalid IPv6 URL
        load_config(gw)
    assert str(info.value) == f"{gw}:3:5: replicas[0].url: not a URL: Invalid IPv6 URL in " + repr(
        "http://[::1"
    )
