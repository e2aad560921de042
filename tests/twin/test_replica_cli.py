"""``loragate replica`` as a subprocess on a free port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
