"""Which proxy ``loragate loadtest`` takes from the environment for a target (the choice only;
tests/loadtest/test_loadtest_openai_options.py sends requests through a real proxy)."""

from __future__ import annotations

import json

import pytest

from loragate.core.errors import ConfigError
from loragate.loadtest.openloop import OpenLoopConfig, request_body
from loragate.loadtest.proxy_env import EnvProxy, env_proxy
from loragate.workload.generator import WorkloadRequest


@pytest.mark.parametrize(
    ("target", "env", "expected"),
    [
        ("http://gw.corp:8080/v1", {"HTTP_PROXY": "http://p:3128"},
         ("http://p:3128", "HTTP_PROXY")),
        ("http://gw.corp/v1", {"http_proxy": "http://lo:1", "HTTP_PROXY": "http://up:2"},
         ("http://lo:1", "http_proxy")),
        ("https://api.example.com/v1", {"HTTP_PROXY": "http://p:1", "HTTPS_PROXY": "http://s:2"},
         ("http://s:2", "HTTPS_PROXY")),
        ("https://api.example.com/v1", {"ALL_PROXY": "p:3128"}, ("http://p:3128", "ALL_PROXY")),
        ("https://api.example.com/v1", {"HTTP_PROXY": "http://p:1"}, None),
        ("http://gw.corp/v1", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "corp"}, None),
        ("http://gw.corp/v1", {"HTTP_PROXY": "http://p:1", "no_proxy": "x, .gw.corp"}, None),
        ("http://gw.corporate/v1", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "corp"},
         ("http://p:1", "HTTP_PROXY")),
        ("http://10.1.2.3:8000/v1", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "x,10.0.0.0/8"},
         None),
        ("http://11.1.2.3:8000/v1", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"},
         ("http://p:1", "HTTP_PROXY")),
        ("http://[fd00::5]:8000/v1", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "fd00::/8"}, None),
        ("http://10.1.2.3:8000/v1", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.1.2.3"}, None),
        ("http://localhost:8080/v1", {"HTTP_PROXY": "http://p:1"}, None),
        ("http://127.0.0.2:8080/v1", {"HTTP_PROXY": "http://p:1"}, None),
        ("http://[::1]:8080/v1", {"HTTP_PROXY": "http://p:1"}, None),
        ("http://gw.corp/v1", {"HTTP_PROXY": "  "}, None),
    ],
)  # fmt: skip
def test_the_proxy_for_a_target(
    target: str, env: dict[str, str], expected: tuple[str, str] | None
) -> None:
    found = env_proxy(target, env)
    assert (None if found is None else (found.url, found.variable)) == expected


def test_a_socks_proxy_is_refused_naming_its_variable() -> None:
    with pytest.raises(ConfigError) as refused:
        env_proxy("http://gw.corp/v1", {"all_proxy": "socks5h://p:1080"})
    assert refused.value.key == "all_proxy"
    assert "socks5h proxy cannot be used" in str(refused.value)


def test_the_proxy_is_shown_without_its_password() -> None:
    assert EnvProxy("http://ops:pw@p:3128", "X").shown() == "http://ops:***@p:3128"
    assert EnvProxy("http://p:3128", "X").shown() == "http://p:3128"


def test_max_completion_tokens_names_the_bound_of_chat_requests_only() -> None:
    cfg = OpenLoopConfig(base_url="http://x/v1", base_model="m", chat_every=3,
                         max_completion_tokens=True)  # fmt: skip
    req = WorkloadRequest(0.0, None, 0, 4, 7)
    bodies = {path: json.loads(body) for path, body in (request_body(cfg, req, i) for i in (0, 2))}
    assert bodies["/completions"]["max_tokens"] == 7
    assert "max_completion_tokens" not in bodies["/completions"]
    assert bodies["/chat/completions"]["max_completion_tokens"] == 7
    assert "max_tokens" not in bodies["/chat/completions"]
