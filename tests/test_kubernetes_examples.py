"""examples/kubernetes/ (no cluster here): every manifest parses, the gateway's probes name
routes the gateway has on the port it listens on, the embedded gateway config passes loragate's
own validation, and the vLLM StatefulSet's flags and DNS names match that config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import hdrs

from loragate.cli import build_parser
from loragate.core.config import ADMIN_TOKEN_ENV, METRICS_TOKEN_ENV, GatewayConfig
from loragate.gateway import create_app, parse_config_text
from loragate.gateway.runner import CUT_GRACE_S, HANDLER_GRACE_S, IDLE_GRACE_S

KUBERNETES = Path(__file__).resolve().parents[1] / "examples" / "kubernetes"

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    out: list[Doc] = []
    files = sorted(KUBERNETES.glob("*.yaml"))
    assert files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert isinstance(doc, dict), path
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            out.append(doc)
    return out


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _container(workload: Doc) -> Doc:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _secret_data(docs: list[Doc], name: str) -> dict[str, str]:
    return dict(_one(docs, "Secret", name)["stringData"])


@pytest.fixture(scope="module")
def config(docs: list[Doc]) -> GatewayConfig:
    text = _secret_data(docs, "loragate-config")["gateway.yaml"]
    return parse_config_text(text, source="secrets.yaml")  # ConfigError if it does not load


def _port_number(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    assert len(numbers) == 1, port
    return int(numbers[0])


def _selects(selector: dict[str, str], workload: Doc) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_manifest_parses_and_names_its_kind(docs: list[Doc]) -> None:
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "Secret", "PodDisruptionBudget"} <= kinds
    assert "ServiceMonitor" in kinds


def test_gateway_probes_name_its_routes_on_its_port(docs: list[Doc], config: GatewayConfig) -> None:
    gateway = _one(docs, "Deployment", "loragate")
    assert gateway["spec"]["replicas"] == 2
    container = _container(gateway)
    args = build_parser().parse_args(container["args"])  # SystemExit if not a valid invocation
    assert args.command == "serve"
    app = create_app(config)  # not started: its routes only
    gets = {
        route.resource.canonical
        for route in app.router.routes()
        if route.method == hdrs.METH_GET and route.resource is not None
    }
    probes = {"livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe, path in probes.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path and path in gets
        assert _port_number(container, http_get["port"]) == args.port


def test_gateway_config_and_tokens_come_from_secrets(docs: list[Doc]) -> None:
    gateway = _one(docs, "Deployment", "loragate")
    container = _container(gateway)
    args = build_parser().parse_args(container["args"])
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    (name,) = (n for n, v in volumes.items() if v.get("secret"))
    secret = volumes[name]["secret"]["secretName"]
    assert "subPath" not in mounts[name]  # a subPath mount never sees the Secret change
    key = Path(args.config).relative_to(mounts[name]["mountPath"]).as_posix()
    assert key in _secret_data(docs, secret)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    for variable in (ADMIN_TOKEN_ENV, METRICS_TOKEN_ENV):
        ref = env[variable]
        assert ref["key"] in _secret_data(docs, ref["name"])


def test_the_grace_period_covers_the_delay_and_the_drain(
    docs: list[Doc], config: GatewayConfig
) -> None:
    pod = _one(docs, "Deployment", "loragate")["spec"]["template"]["spec"]
    server = config.server
    assert server.shutdown_delay_s > 0  # Kubernetes needs it: endpoints go after SIGTERM
    needed = (
        server.shutdown_delay_s
        + IDLE_GRACE_S  # idle keep-alive connections' last second (listener_close)
        + server.shutdown_timeout_s
        + CUT_GRACE_S
        + 2 * HANDLER_GRACE_S
    )
    assert pod["terminationGracePeriodSeconds"] >= needed + 1  # + a margin for the cleanup
    assert "lifecycle" not in _container(_one(docs, "Deployment", "loragate"))  # no preStop


def _flags(args: list[str]) -> dict[str, str | None]:
    """``--flag value`` / ``--flag`` pairs of a vLLM command line."""
    out: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[i + 1] if i + 1 < len(args) else None
            out[arg] = None if following is None or following.startswith("--") else following
    return out


def test_vllm_statefulset_matches_the_gateway_config(
    docs: list[Doc], config: GatewayConfig
) -> None:
    vllm = _one(docs, "StatefulSet", "vllm")
    service = _one(docs, "Service", vllm["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    assert _selects(service["spec"]["selector"], vllm)
    container = _container(vllm)
    flags = _flags(container["args"])
    port = int(flags["--port"] or 0)
    assert _port_number(container, service["spec"]["ports"][0]["targetPort"]) == port
    name, svc = vllm["metadata"]["name"], service["metadata"]["name"]
    expected = {f"http://{name}-{i}.{svc}:{port}" for i in range(vllm["spec"]["replicas"])}
    assert {r.url for r in config.replicas} == expected
    assert "--enable-lora" in flags and flags["--served-model-name"] == config.base_model
    for replica in config.replicas:
        settings = replica.settings
        assert settings is not None, replica.replica_id
        assert int(flags["--max-loras"] or 0) == settings.max_loras
        assert int(flags["--max-cpu-loras"] or 0) == settings.max_cpu_loras
        assert int(flags["--max-lora-rank"] or 0) == settings.max_lora_rank
    max_rank = int(flags["--max-lora-rank"] or 0)
    assert all(a.rank is None or a.rank <= max_rank for a in config.adapters)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert "/dev/shm" in mounts  # vLLM's processes share memory: 64 MB is too little
    for adapter in config.adapters:  # each adapter path is on a volume the vLLM pods mount
        assert any(adapter.path.startswith(m.rstrip("/") + "/") for m in mounts), adapter.path


def test_services_and_budgets_select_their_pods(docs: list[Doc]) -> None:
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for doc in docs:
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        elif doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        else:
            continue
        targets = [w for w in workloads if _selects(selector, w)]
        assert len(targets) == 1, doc["metadata"]["name"]
        if doc["kind"] == "Service":
            for port in doc["spec"]["ports"]:
                _port_number(_container(targets[0]), port["targetPort"])


def test_redis_url_and_metrics_scrape_point_at_what_is_deployed(
    docs: list[Doc], config: GatewayConfig
) -> None:
    redis = _one(docs, "Service", "redis")
    assert config.state.backend == "redis"
    assert config.state.redis_url == f"redis://redis:{redis['spec']['ports'][0]['port']}/0"
    monitor = _one(docs, "ServiceMonitor", "loragate")
    service = _one(docs, "Service", "loragate")
    assert all(
        service["metadata"]["labels"].get(k) == v
        for k, v in monitor["spec"]["selector"]["matchLabels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    credentials = endpoint["authorization"]["credentials"]
    container = _container(_one(docs, "Deployment", "loragate"))
    tokens = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert credentials == tokens[METRICS_TOKEN_ENV]  # the secret and key the gateway reads
