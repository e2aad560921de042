"""A streaming client that goes away is normal: ``loragate replica`` ends the stream quietly.

Found in a soak test: a replica paused (SIGSTOP) while the gateway gave up on its requests
wrote, once resumed (SIGCONT), an aiohttp traceback ``ClientConnectionResetError: Cannot write
to closing transport`` per request, from the stream's response head written to a socket the
client had already closed. vLLM 0.32 aborts such a request and logs nothing by default (only
with ``--enable-log-requests``: "Request ... aborted." at INFO). The replica must log no
traceback or ERROR, and abort the engine request so that it frees its slot.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from loragate.commands.replica import READY_PREFIX

STARTUP_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 20.0  # bound on the engine's running count returning to 0
MODEL = "tiny-llama"


def _start() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loragate.cli",
            "replica",
            "--port",
            "0",
            "--served-model-name",
            MODEL,
            "--max-model-len",
            "4096",
            "--profile",
            "fast",
            "--seed",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _stream_request() -> bytes:
    # Long enough (ignore_eos, 3000 tokens at the fast profile's pace) to be mid-stream
    # whenever the client closes.
    body = json.dumps(
        {"model": MODEL, "prompt": "hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    ).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of the series ``name`` whose labels include ``labels``."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_:]+)\{(.*)\} (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise AssertionError(f"no {name}{labels} in /metrics")


def _settled(url: str, aborted: int) -> str:
    """/metrics once no request runs or waits and ``aborted`` requests ended as aborts."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        busy = _metric(text, "vllm:num_requests_running") + _metric(
            text, "vllm:num_requests_waiting"
        )
        done = _metric(text, "vllm:request_success_total", finished_reason="abort")
        if busy == 0 and done == aborted:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy after {SETTLE_TIMEOUT_S} s:\n{text}")
        time.sleep(0.05)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


@pytest.mark.parametrize("when", ["mid_stream", "before_the_head"])
def test_a_client_gone_ends_its_stream_quietly_and_frees_the_engine(when: str) -> None:
    proc = _start()
    stopped = False
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()  # blocks until ready (or the process dies)
        assert line.startswith(READY_PREFIX), line
        url = line.rsplit(" ", 1)[-1].strip()
        for _ in range(3):
            if when == "before_the_head":
                # The gateway's view of a paused replica: its request waits in the socket,
                # the gateway gives up and closes; the replica resumes and finds both.
                proc.send_signal(signal.SIGSTOP)
                stopped = True
            sock = _connect(url)
            sock.sendall(_stream_request())
            if when == "mid_stream":
                got = b""
                while b"data: " not in got:  # the head and a first token event
                    chunk = sock.recv(4096)
                    assert chunk, got
                    got += chunk
            sock.close()
            if stopped:
                proc.send_signal(signal.SIGCONT)
                stopped = False
        metrics = _settled(url, aborted=3)
        assert _metric(metrics, "vllm:request_success_total", finished_reason="length") == 0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
        assert "Error handling request" not in err, err
        assert "ERROR" not in err, err
    finally:
        if stopped:
            proc.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
