"""``loragate serve`` as a real process (uvloop entry point) in front of a scripted replica."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from gateway_harness import BASE, ScriptedReplica, serve_process

from loragate.cli import build_parser, main
from loragate.core.errors import ConfigError
from loragate.gateway import load_config, parse_config_text


def test_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys: object) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("base_model: m\nreplicas: [{url: 'ftp://x'}]\n", encoding="utf-8")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "replicas[0].url" in err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2


async def test_serve_process_proxies_and_stops_on_sigterm(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        f"base_model: {BASE}\nreplicas: ['{replicas[0].url}']\n"
        "adapters: [{name: lora-0, path: /loras/lora-0}]\n",
        encoding="utf-8",
    )
    async with serve_process(path) as serve:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                serve.url + "/v1/completions", json={"model": "lora-0", "prompt": "p"}
            ) as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["model"] == "lora-0"
        serve.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"base_model: m\nreplicas: [http://127.0.0.1:1\n", "bad.yaml:3:1: not valid YAML"),
        (b"base_model: m\n\treplicas: []\n", "bad.yaml:2:1: not valid YAML"),
        (b"\xff\xfebase_model: m\n", "bad.yaml is not a UTF-8 text file (byte 0: 0xff)"),
    ],
    ids=["unclosed-list", "tab", "not-utf8"],
)
def test_a_broken_file_is_one_line_naming_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "base_model: m\nreplicas: [http://127.0.0.1:1]\nbase_model: n\n",
            "gw.yaml:3:1: duplicate key 'base_model'",
        ),
        (
            "base_model: m\nreplicas:\n  - {url: 'http://127.0.0.1:1', url: 'http://127.0.0.1:2'}\n",
            "gw.yaml:3:33: duplicate key 'url'",
        ),
    ],
    ids=["top-level", "nested"],
)
def test_a_key_written_twice_is_an_error(tmp_path: Path, content: str, expected: str) -> None:
    """YAML itself lets the last one win: a second ``replicas:`` would drop the first list."""
    path = tmp_path / "gw.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert expected in str(exc.value)


def test_yaml_merge_keys_are_not_duplicates() -> None:
    config = parse_config_text(
        "base_model: m\nreplicas: [http://127.0.0.1:1]\n"
        "poller: &p {interval_s: 2}\nlimits: {max_body_bytes: 10}\n"
    )
    assert config.poller.interval_s == 2.0
    merged = parse_config_text(
        "base_model: m\nreplicas:\n"
        "  - &r {id: a, url: 'http://127.0.0.1:1', settings: {max_loras: 3}}\n"
        "  - {<<: *r, id: b, url: 'http://127.0.0.1:2'}\n"  # one URL twice is refused
    )
    assert [r.replica_id for r in merged.replicas] == ["a", "b"]
    assert [r.settings.max_loras for r in merged.replicas if r.settings] == [3, 3]


def test_a_port_in_use_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.gateway.runner")
    path = tmp_path / "gw.yaml"
    path.write_text("base_model: m\nreplicas: ['http://127.0.0.1:9']\n", encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--config", str(path), "--host", "127.0.0.1", "--port", str(port)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"loragate serve: cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err
    # It never served: no shutdown story ("not accepting connections ... waiting up to 25 s").
    assert not [r for r in caplog.records if "shutdown" in r.getMessage()]


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_bad_port_flag_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], port: str
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("base_model: m\nreplicas: ['http://127.0.0.1:9']\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:  # refused by the parser, before anything runs
        build_parser().parse_args(["serve", "--config", str(path), f"--port={port}"])
    assert exc.value.code == 2
    assert "argument --port" in capsys.readouterr().err


async def test_a_port_in_use_fails_before_any_replica_traffic(tmp_path: Path) -> None:
    """``loragate serve`` binds its socket before it polls a replica: on a port in use it exits
    at once with one line, and the replica (a listening socket that records every connection)
    never hears from it."""
    connections = 0

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    replica = await asyncio.start_server(record, "127.0.0.1", 0)
    replica_port = replica.sockets[0].getsockname()[1]
    path = tmp_path / "gw.yaml"
    path.write_text(
        f"base_model: {BASE}\nreplicas: ['http://127.0.0.1:{replica_port}']\n", encoding="utf-8"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loragate.cli", "serve", "--config", str(path),
            "--host", "127.0.0.1", "--port", str(port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    replica.close()
    await replica.wait_closed()
    assert proc.returncode == 1  # the exit status of every "cannot listen" (serve, replica)
    assert out == b""
    assert err.decode() == (
        f"loragate serve: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
    assert connections == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "base_model: m\nreplicas: ['http://127.0.0.1:1']\nlimits:\n  request_timeout_s: -1\n",
            "gw.yaml:4:3: limits.request_timeout_s: must be a positive number of seconds, got -1",
        ),
        (
            "base_model: m\nreplicas: ['http://127.0.0.1:1']\nlimits:\n  request_timout_s: 5\n",
            "gw.yaml:4:3: limits.request_timout_s: unknown key "
            "(is 'request_timout_s' a misspelling of 'request_timeout_s'?)",
        ),
        # PyYAML recursed per level: a RecursionError and a traceback of ~3,000 lines
        (
            "base_model: m\nreplicas: " + "[" * 5000 + "]" * 5000 + "\n",
            "gw.yaml:2:110: nested more than 100 levels deep",
        ),
    ],
    ids=["bad-value", "misspelt-key", "nested-too-deep"],
)
def test_a_bad_config_is_one_line_naming_the_file_the_line_and_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(content, encoding="utf-8")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"loragate serve: bad config: {tmp_path}/{expected}")  # named once
    assert err.count("\n") == 1 and "Traceback" not in err


def test_serve_in_process_leaves_the_signal_handlers_as_they_were(tmp_path: Path) -> None:
    """uvloop leaves its handler on SIGINT/SIGTERM after its loop closed: a process that goes
    on after main(["serve", ...]) swallowed Ctrl-C and SIGTERM, and so did every child it
    forked later (a process pool's workers ignored terminate(): tests/core hung after this)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    path = tmp_path / "gw.yaml"
    path.write_text("base_model: m\nreplicas: ['http://127.0.0.1:9']\n", encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert (
            main(["serve", "--config", str(path), "--port", str(port), "--host", "127.0.0.1"]) == 1
        )
    assert {sig: signal.getsignal(sig) for sig in before} == before
