"""Replica URLs: one vLLM server listed twice, and ports that cannot be connected to, are
refused at load, naming the keys."""

from __future__ import annotations

import pytest

from loragate.core.config import config_from_mapping, replica_address
from loragate.core.errors import ConfigError


def _load(replicas: list[object]) -> None:
    config_from_mapping({"base_model": "m", "replicas": replicas})


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://127.0.0.1:28101", "http://127.0.0.1:28101"),
        ("http://127.0.0.1:28101", "http://127.0.0.1:28101/"),
        ("http://vllm-a:8000", "HTTP://VLLM-A:8000"),
        ("http://vllm-a", "http://vllm-a:80/"),
        ("https://vllm-a:443", "https://vllm-a"),
        ("http://[::1]:8000", "http://[::1]:8000//"),
        ("http://h:8000/vllm", "http://h:8000/vllm/"),
    ],
)
def test_the_same_server_twice_is_refused_naming_both_keys(first: str, second: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load([{"id": "a", "url": first}, "http://other:1", {"id": "b", "url": second}])
    assert info.value.key == "replicas[2].url"
    message = str(info.value)
    assert "replicas[0].url" in message and "same server" in message
    assert repr(second) in message


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://h:8000", "http://h:8001"),
        ("http://h:8000", "https://h:8000"),
        ("http://h:8000/a", "http://h:8000/b"),
        # Not resolved at load: the same machine under two names is not detected here.
        ("http://127.0.0.1:28101", "http://localhost:28101/"),
    ],
)
def test_different_servers_load(first: str, second: str) -> None:
    _load([first, second])


def test_the_address_compared() -> None:
    assert replica_address("HTTPS://Host.Example/") == "https://host.example:443"
    assert replica_address("http://[::1]/v/") == "http://[::1]:80/v"


@pytest.mark.parametrize("url", ["http://h:0", "http://h:0/", "https://h:00"])
def test_port_zero_is_refused(url: str) -> None:
    """Before, it loaded and the upstream pool connected to port 80 (``parts.port or 80``)."""
    with pytest.raises(ConfigError) as info:
        _load([url])
    assert info.value.key == "replicas[0].url"
    assert "a port is 1-65535" in str(info.value)


@pytest.mark.parametrize("url", ["http://h:65536", "http://h:-1", "http://h:99999999"])
def test_out_of_range_ports_are_refused(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load([url])
    assert info.value.key == "replicas[0].url"
    assert "a port is 1-65535" in str(info.value)


def test_the_highest_and_lowest_ports_load() -> None:
    _load(["http://h:1", "http://h:65535"])
