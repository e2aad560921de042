"""The suite's own guard (``resource_leaks.py``, loaded by ``conftest.py``): a test that leaves
a client open fails in its own teardown, and the test that happens to run when the garbage
collector finalizes the client no longer fails in its place. Run as an inner pytest session
with this suite's conftest and pytest settings, against a keep-alive HTTP server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

INNER_TESTS = """
import gc
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai


class _Models(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's connection stays open

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


SERVER = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
SERVER.daemon_threads = True
threading.Thread(target=SERVER.serve_forever, daemon=True).start()


def _client() -> openai.AsyncOpenAI:
    url = f"http://127.0.0.1:{SERVER.server_address[1]}/v1"
    return openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)


async def test_closes_its_client() -> None:
    async with _client() as client:
        assert [m async for m in client.models.list()] == []


async def test_leaks_its_client() -> None:
    client = _client()
    assert [m async for m in client.models.list()] == []  # its connection stays in its pool


def test_innocent() -> None:
    gc.collect()  # the garbage collector happens to run during this test
"""


def _outcomes(tmp_path: Path) -> tuple[dict[str, set[str]], str]:
    """Runs the inner tests in order; each test's outcomes in pytest's ``-rA`` summary
    (PASSED, ERROR for an error in its setup or teardown), and the whole output."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER_TESTS, encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q",
            "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path),
            "--confcutdir", str(tmp_path), str(tmp_path / "test_inner.py"),
        ],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(TESTS)},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    outcomes: dict[str, set[str]] = {}
    for line in done.stdout.splitlines():
        word, _, rest = line.partition(" test_inner.py::")
        if rest:
            outcomes.setdefault(rest.split(" ")[0], set()).add(word)
    return outcomes, done.stdout + done.stderr


def test_a_leaked_client_fails_the_test_that_leaked_it(tmp_path: Path) -> None:
    outcomes, output = _outcomes(tmp_path)
    assert outcomes == {
        "test_closes_its_client": {"PASSED"},
        "test_leaks_its_client": {"PASSED", "ERROR"},  # its call passed, its teardown errs
        "test_innocent": {"PASSED"},
    }, output
    # The error names what was left open.
    assert "ResourceWarning: unclosed transport" in output, output
