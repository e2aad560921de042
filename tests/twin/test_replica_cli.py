"""``loragate replica`` as a subprocess on a free port."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from loragate.cli import main
from loragate.commands.replica import READY_PREFIX

MakeAdapterDir = Callable[..., str]


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "loragate.cli", "replica", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()


def test_cli_serves_health_models_and_stops_on_sigterm(
    adapter_dir: MakeAdapterDir, tmp_path: Path
) -> None:
    a, b = adapter_dir("lora-a"), adapter_dir("lora-b", 16)
    proc = start(
        [
            "--port",
            "0",
            "--served-model-name",
            "tiny-llama",
            "--model",
            "/m/tiny",
            "--enable-lora",
            "--max-loras",
            "2",
            "--max-model-len",
            "512",
            "--lora-modules",
            f"lora-a={a}",
            "--lora-modules",
            f"lora-b={b}",
            "--profile",
            "fast",
            "--time-scale",
            "10",
            "--seed",
            "3",
        ]
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until ready (or the process dies)
        assert line.startswith(READY_PREFIX), (line, proc.stderr.read() if proc.stderr else "")
        url = line.rsplit(" ", 1)[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        assert get(url + "/health") == (200, b"")
        status, body = get(url + "/v1/models")
        assert status == 200
        assert [c["id"] for c in json.loads(body)["data"]] == ["tiny-llama", "lora-a", "lora-b"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-lora-rank", "12"], "max_lora_rank"),
        (["--lora-modules", "broken"], "name=path"),
        (["--enable-lora", "--lora-modules", "x=/definitely/not/here"], "No adapter found"),
    ],
)
def test_cli_rejects_bad_settings(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replica", "--port", "0", *args]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == ""


def test_the_design_documents_spelling_with_simulated_is_accepted() -> None:
    """ARCHITECTURE.md writes the command ``loragate replica --simulated``."""
    from loragate.cli import build_parser

    args = build_parser().parse_args(["replica", "--simulated", "--port", "0"])
    assert args.simulated is True
    assert build_parser().parse_args(["replica", "--port", "0"]).simulated is False


def _post(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_cli_shutdown_timeout_drains_on_sigterm_as_vllm() -> None:
    """vLLM's --shutdown-timeout: after SIGTERM the replica still listens, /health says 200,
    a new request gets vLLM's 500, the request in flight finishes; then it exits 0."""
    proc = start(["--port", "0", "--profile", "fast", "--time-scale", "0.2",
                  "--shutdown-timeout", "3600"])  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX), (line, proc.stderr.read() if proc.stderr else "")
        url = line.rsplit(" ", 1)[-1].strip()
        long = {"prompt": "long", "max_tokens": 300, "ignore_eos": True}  # ~3 s here
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(_post, url + "/v1/completions", long)
            for _ in range(1000):  # until it runs (bounded)
                metrics = get(url + "/metrics")[1].decode()
                if re.search(r"^vllm:num_requests_running\{[^}]*\} 1\.0$", metrics, re.M):
                    break
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            for _ in range(1000):  # until the signal is handled (bounded)
                status, body = _post(url + "/v1/completions", {"prompt": "new", "max_tokens": 1})
                if status != 200:
                    break
            assert (status, body["error"]) == (500, {  # type: ignore[index]
                "message": "cannot schedule new futures after shutdown",
                "type": "InternalServerError", "param": None, "code": 500})  # fmt: skip
            assert get(url + "/health") == (200, b"")
            status, done = in_flight.result(timeout=120)
        assert status == 200 and done["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_refuses_a_negative_shutdown_timeout() -> None:
    proc = start(["--port", "0", "--shutdown-timeout", "-1"])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "shutdown_timeout" in err and "must be >= 0, got -1.0" in err


def test_replica_in_process_leaves_the_signal_handlers_as_they_were() -> None:
    """uvloop leaves its handler on SIGINT/SIGTERM after its loop closed: a process that goes
    on after main(["replica", ...]) swallowed Ctrl-C and SIGTERM, and so did every child it
    forked later (as ``serve`` did before 2e43527)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["replica", "--host", "127.0.0.1", "--port", str(port)]) == 1
    assert {sig: signal.getsignal(sig) for sig in before} == before
