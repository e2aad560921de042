"""``loragate serve --config FILE --check``: FILE loaded and validated as ``serve`` loads it,
nothing served and nothing contacted. A good file is one OK line on stdout whose policy and
sha256 are the ones a gateway serving it shows in ``loragate_config_info`` (over loopback),
exit 0; a bad file, a bad ``LORAGATE_ADMIN_TOKEN`` or ``LORAGATE_LOG_FORMAT`` is serve's own
one line on stderr, exit 2. Before: ``--check`` was an unknown argument (usage, exit 2)."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from loragate.cli import main
from loragate.gateway import load_config, running_gateway

GOOD = """\
base_model: tiny-llama
replicas:
  - {id: r0, url: "http://127.0.0.1:9"}
  - {id: r1, url: "http://127.0.0.1:10"}
adapters: [{name: lora-0, path: /loras/lora-0}]
tenants: [{name: acme, api_keys: [sk-acme]}]
routing: {policy: consistent_hash, load_factor: 1.5}
poller: {interval_s: 3600}
"""


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(text, encoding="utf-8")
    return path


async def test_a_good_config_is_one_ok_line_with_the_sha256_a_served_gateway_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, GOOD)
    assert main(["serve", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    [line] = out.splitlines()
    assert line.startswith(
        f"loragate serve: {path}: config OK (2 replicas, 1 adapter, 1 tenant; state memory; "
    ), line
    found = re.search(r"loragate_config_info policy=(\S+) sha256=([0-9a-f]{64})\)$", line)
    assert found is not None, line
    async with (
        running_gateway(load_config(path), port=0) as gw,
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/metrics") as resp,
    ):
        text = await resp.text()
    [info] = [x for x in text.splitlines() if x.startswith("loragate_config_info{")]
    assert f'policy="{found.group(1)}"' in info and f'sha256="{found.group(2)}"' in info
    assert found.group(1) == "consistent_hash"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (GOOD.replace("load_factor: 1.5", "load_factr: 1.5"), "routing.load_factr"),
        (GOOD.replace('"http://127.0.0.1:10"', '"ftp://x"'), "replicas[1].url"),
        (GOOD.replace("policy: consistent_hash", "policy: nope"), "unknown policy 'nope'"),
    ],
    ids=["routing-key", "replica-url", "policy"],
)
def test_a_bad_config_is_serves_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    path = _config(tmp_path, text)
    assert main(["serve", "--config", str(path)]) == 2
    served = capsys.readouterr().err
    assert main(["serve", "--config", str(path), "--check"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == served  # the same one line as serve
    [line] = captured.err.splitlines()
    assert line.startswith(f"loragate serve: bad config: {path}:") and says in line, line


def test_a_missing_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    assert main(["serve", "--config", str(missing), "--check"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"loragate serve: bad config {missing}: "), line


@pytest.mark.parametrize(
    ("env", "value", "says"),
    [
        ("LORAGATE_ADMIN_TOKEN", "s3cret\n", "environment variable LORAGATE_ADMIN_TOKEN"),
        ("LORAGATE_METRICS_TOKEN", "s3cret\n", "environment variable LORAGATE_METRICS_TOKEN"),
        ("LORAGATE_LOG_FORMAT", "xml", "LORAGATE_LOG_FORMAT='xml': expected one of"),
    ],
)
def test_the_environment_variables_serve_reads_are_checked(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: str,
    value: str,
    says: str,
) -> None:
    path = _config(tmp_path, GOOD)
    monkeypatch.setenv(env, value)
    assert main(["serve", "--config", str(path), "--check"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("loragate serve: ") and says in line, line
    assert "s3cret" not in line
