"""``loragate loadtest --api-keys FILE``: a fleet whose tenants each hold one adapter (one key
sees only its own: ``GET /v1/models`` with one key lists one adapter, and a request for another
tenant's adapter is refused) is load-tested across every adapter, each request sent with its
model's key. Before, ``--api-key`` was the only key: every workload adapter was mapped onto the
one model that key sees. A real gateway in front of a simulated replica, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from loadtest_files import write_spec

from loragate.cli import main
from loragate.core.config import config_from_mapping
from loragate.gateway.runner import running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica

BASE = "tiny-llama"
TENANTS = 3

SPEC = """\
name: tiny
seed: 5
duration_s: 3
adapters:
  count: 6
  popularity: {kind: zipf, s: 1.2}
  base_fraction: 0.2
arrivals: {process: poisson, rate_rps: 40}
lengths: {prompt: 16, output: {kind: uniform, min: 2, max: 8}}
"""


@pytest.fixture
async def gateway_url(tmp_path: Path) -> AsyncIterator[str]:
    """One twin replica behind a gateway with three tenants, each with one adapter."""
    adapters = [
        {
            "name": f"cust-{i}",
            "path": write_adapter_folder(str(tmp_path / f"cust-{i}"), rank=8),
            "rank": 8,
            "tenants": [f"t{i}"],
        }
        for i in range(TENANTS)
    ]
    async with contextlib.AsyncExitStack() as stack:
        replica = await stack.enter_async_context(
            run_replica(
                ReplicaConfig(served_model_name=BASE, enable_lora=True, max_loras=4),
                host="127.0.0.1",
                port=0,
            )
        )
        config = config_from_mapping(
            {
                "base_model": BASE,
                "replicas": [{"id": "r0", "url": replica.url}],
                "adapters": adapters,
                "tenants": [{"name": f"t{i}", "api_keys": [f"sk-t{i}"]} for i in range(TENANTS)],
            }
        )
        gateway = await stack.enter_async_context(running_gateway(config, host="127.0.0.1", port=0))
        yield gateway.url


async def loadtest(*argv: str) -> int:
    return await asyncio.to_thread(main, ["loadtest", "--progress-s", "0", *argv])


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


CSV = "model,api_key\n" + "".join(f"cust-{i},sk-t{i}\n" for i in range(TENANTS)) + f"{BASE},sk-t0\n"
YAML = "".join(f"cust-{i}: sk-t{i}\n" for i in range(TENANTS)) + f"{BASE}: sk-t0\n"


@pytest.mark.parametrize(("name", "text"), [("keys.csv", CSV), ("keys.yaml", YAML)])
async def test_every_tenant_s_adapter_is_load_tested_with_its_own_key(
    gateway_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    text: str,
) -> None:
    keys = tmp_path / name
    keys.write_text(text, encoding="utf-8")
    out_records = tmp_path / "records.jsonl"
    code = await loadtest(
        "--url", gateway_url, "--workload", str(write_spec(tmp_path, SPEC)),
        "--api-keys", str(keys), "--max-requests", "40", "--timeout-s", "30",
        "--results", str(out_records),
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    rows = _records(out_records)
    assert len(rows) == 40 and all(r["status"] == 200 for r in rows), err
    assert {r["model"] for r in rows if r["adapter"] is not None} == {
        f"cust-{i}" for i in range(TENANTS)
    }
    assert {r["model"] for r in rows if r["adapter"] is None} == {BASE}
    assert f"6 workload adapters -> {TENANTS} model(s) from --api-keys" in err
    assert f"--api-keys {keys}: {TENANTS + 1} models with their own key" in err


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("k.csv", "a,sk-1\nb,sk-2\na,sk-3\n", "k.csv:3: model 'a' is written twice (line 1)"),
        ("k.csv", "a,sk-1,x\n", "k.csv:1: expected 'model,key', got 3 field(s)"),
        ("k.csv", "# none\n\n", "k.csv: no model in the --api-keys file"),
        ("k.yaml", "a: sk-1\nb: sk 2\n", "k.yaml:2:1: b: the key of 'b' holds ' '"),
        ("k.yaml", "a: sk-1\na: sk-2\n", "k.yaml:2:1: duplicate key 'a'"),
        ("k.yaml", "[a, b]\n", "k.yaml:1:1: expected a mapping of model -> key, got list"),
    ],
    ids=["csv-twice", "csv-fields", "csv-empty", "yaml-space", "yaml-twice", "yaml-list"],
)
def test_a_bad_keys_file_is_one_line_naming_the_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, says: str
) -> None:
    keys = tmp_path / name
    keys.write_text(text, encoding="utf-8")
    argv = ["loadtest", "--url", "http://127.0.0.1:9", "--workload",
            str(write_spec(tmp_path, SPEC)), "--api-keys", str(keys)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{tmp_path}/{says}" in err[0], err[0]


async def test_a_keys_file_naming_only_the_base_model_keeps_models_auto(
    gateway_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The adapters come from ``GET /v1/models`` as with no file. Before, the run stopped with
    "--models: expected 'auto' or a comma-separated list, got []" (--models was not given)."""
    keys = tmp_path / "keys.csv"
    keys.write_text(f"{BASE},sk-t0\n", encoding="utf-8")
    out_records = tmp_path / "records.jsonl"
    code = await loadtest(
        "--url", gateway_url, "--workload", str(write_spec(tmp_path, SPEC)),
        "--api-keys", str(keys), "--api-key", "sk-t0", "--max-requests", "20",
        "--timeout-s", "30", "--results", str(out_records),
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--models" not in err, err
    rows = _records(out_records)
    assert len(rows) == 20 and all(r["status"] == 200 for r in rows), err
    assert {r["model"] for r in rows if r["adapter"] is not None} == {"cust-0"}  # what t0 sees
    assert "6 workload adapters -> 1 model(s) from GET /v1/models" in err
