"""Error answers of the gateway's own endpoints are counted in
``loragate_endpoint_errors_total{endpoint,status}`` (by endpoint class, never the raw path) and
failed authentications are logged, at most one WARNING a minute saying how many more came,
never the token. Before, an admin 401 (token guessing), a 401 on ``/v1/models`` or
``/metrics``, a 404 for an unknown path and a 405 changed no metric and logged nothing; a
wrong or missing tenant key on the completions endpoints was counted (loragate_requests_total)
but not logged."""

from __future__ import annotations

import logging
import re

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client

from loragate.core.clock import VirtualClock
from loragate.gateway import running_gateway

ADMIN = "admin-s3cret"
SCRAPE = "scrape-s3cret"


async def _errors(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], int]:
    async with http.get(url + "/metrics", headers={"Authorization": f"Bearer {SCRAPE}"}) as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (endpoint, status): int(float(n))
        for endpoint, status, n in re.findall(
            r'loragate_endpoint_errors_total\{endpoint="([^"]*)",status="([^"]*)"\} (\S+)', text
        )
    }


def _auth_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("authentication failed")
    ]


async def test_errors_of_the_gateways_own_endpoints_are_counted_and_auth_failures_logged(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = gateway_config(
        [r.url for r in replicas],
        admin={"token": ADMIN},
        metrics={"token": SCRAPE},
        tenants=[{"name": "acme", "api_keys": ["sk-acme"]}],
    )
    clock = VirtualClock(1000.0)
    caplog.set_level(logging.WARNING, logger="loragate.gateway")
    async with running_gateway(cfg, port=0, clock=clock) as gw, aiohttp.ClientSession() as http:
        # Nothing failed yet: the failed-authentication series are there, at 0.
        assert await _errors(http, gw.url) == {
            ("admin", "401"): 0, ("models", "401"): 0, ("metrics", "401"): 0,
        }  # fmt: skip

        async def call(method: str, path: str, token: str | None = None) -> int:
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            async with http.request(method, gw.url + path, headers=headers) as resp:
                return resp.status

        guesses = ["guess-1", "guess-2", None]
        assert [await call("GET", "/admin/replicas", g) for g in guesses] == [401] * 3
        assert await call("GET", "/v1/models", "sk-wrong") == 401
        assert await call("GET", "/metrics", "guess-3") == 401
        assert await call("GET", "/no/such/path-1", ADMIN) == 404
        assert await call("GET", "/no/such/path-2") == 404
        assert await call("GET", "/v1/completions", "sk-acme") == 405
        assert await call("GET", "/admin/replicas/r9", ADMIN) == 404
        assert await call("GET", "/admin/replicas/r0/drain", ADMIN) == 405
        assert await call("GET", "/admin/replicas", ADMIN) == 200  # not counted
        assert await call("GET", "/v1/models", "sk-acme") == 200
        assert await _errors(http, gw.url) == {
            ("admin", "401"): 3, ("models", "401"): 1, ("metrics", "401"): 1,
            ("other", "404"): 2, ("api", "405"): 1, ("admin", "404"): 1, ("admin", "405"): 1,
        }  # fmt: skip
        # One line for the five failures, the first's; a minute later the next, with the count.
        (first,) = _auth_lines(caplog)
        assert re.match(
            re.escape(
                "authentication failed: GET /admin/replicas from 127.0.0.1 with a wrong "
                "Authorization header"
            )
            + r" \(401, request [0-9a-f]{12}-[0-9]+\); at most one such line per 60 s",
            first,
        ), first
        clock.advance_by(60.0)
        assert await call("POST", "/admin/reload") == 401
        _, second = _auth_lines(caplog)
        assert re.match(
            re.escape(
                "authentication failed: POST /admin/reload from 127.0.0.1 without an "
                "Authorization header"
            )
            + r" \(401, request [0-9a-f]{12}-[0-9]+\); 4 more since the last such line",
            second,
        ), second
    for secret in ("guess-1", "guess-2", "guess-3", "sk-wrong", ADMIN, SCRAPE):
        assert secret not in caplog.text


def _unauthenticated_requests(text: str) -> int:
    """loragate_requests_total{status="401"}, over every adapter and replica."""
    return sum(
        int(float(n))
        for n in re.findall(r'loragate_requests_total\{[^}]*status="401"[^}]*\} (\S+)', text)
    )


async def test_a_wrong_or_missing_tenant_key_on_the_completions_endpoints_is_logged_too(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = gateway_config(
        [r.url for r in replicas],
        admin={"token": ADMIN},
        tenants=[{"name": "acme", "api_keys": ["sk-acme"]}],
    )
    clock = VirtualClock(1000.0)
    caplog.set_level(logging.WARNING, logger="loragate.gateway")
    async with (
        running_gateway(cfg, port=0, clock=clock) as gw,
        aiohttp.ClientSession() as http,
        openai_client(gw.url, key="sk-wrong") as wrong,
        openai_client(gw.url, key="sk-acme") as acme,
    ):
        with pytest.raises(openai.AuthenticationError):
            await wrong.completions.create(model=BASE, prompt="x", max_tokens=2)
        (first,) = _auth_lines(caplog)
        assert re.match(
            re.escape(
                "authentication failed: POST /v1/completions from 127.0.0.1 with a wrong "
                "Authorization header"
            )
            + r" \(401, request [0-9a-f]{12}-[0-9]+\); at most one such line per 60 s",
            first,
        ), first
        # The same limit as the gateway's own endpoints: within the minute, counted only.
        with pytest.raises(openai.AuthenticationError):
            await wrong.chat.completions.create(
                model=BASE, messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
        async with http.get(gw.url + "/admin/replicas", headers={"Authorization": "Bearer g"}):
            pass
        await acme.completions.create(model=BASE, prompt="x", max_tokens=2)  # not a failure
        assert len(_auth_lines(caplog)) == 1
        clock.advance_by(60.0)
        async with http.post(gw.url + "/v1/chat/completions", json={"model": BASE}) as resp:
            assert resp.status == 401
        _, second = _auth_lines(caplog)
        assert re.match(
            re.escape(
                "authentication failed: POST /v1/chat/completions from 127.0.0.1 without an "
                "Authorization header"
            )
            + r" \(401, request [0-9a-f]{12}-[0-9]+\); 2 more since the last such line",
            second,
        ), second
        # Counted where proxied requests are, not among the gateway's own endpoints' errors.
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert _unauthenticated_requests(text) == 3
        assert await _errors(http, gw.url) == {
            ("admin", "401"): 1, ("models", "401"): 0, ("metrics", "401"): 0,
        }  # fmt: skip
    for secret in ("sk-wrong", "sk-acme", ADMIN):
        assert secret not in caplog.text
