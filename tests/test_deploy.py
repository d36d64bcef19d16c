"""Deployment files: the Dockerfile and deploy/k8s/ manifests.

Every manifest must be a schema-valid Kubernetes object (the OpenAPI schemas bundled in
`kubernetes-validate`, offline, strict: unknown fields are errors); probes, ports, container
arguments and the Prometheus adapter's series must match what the server really serves.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33.0"


def _docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def _one(kind: str) -> dict[str, Any]:
    found = [d for _, d in _docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def _serve_args(argv: list[str]) -> Any:
    from qwenkit.cli.main import build_parser

    return build_parser().parse_args(["serve", *argv])


def _routes() -> dict[str, set[str]]:
    from qwenkit.serve.app import create_app
    from qwenkit.serve.settings import ServerSettings

    app = create_app(ServerSettings(model="x"), engine_factory=lambda: None)  # never started
    return {r.path: set(r.methods) for r in app.routes if hasattr(r, "methods")}


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_every_manifest_is_a_schema_valid_kubernetes_object() -> None:
    import kubernetes_validate

    docs = _docs()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_the_schema_check_can_fail() -> None:
    import kubernetes_validate

    bad = json.loads(json.dumps(_one("Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_probes_hit_the_apps_health_and_ready_routes_on_the_served_port() -> None:
    routes = _routes()
    dep = _one("Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = _serve_args(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == args.port
    assert args.host == "0.0.0.0"  # reachable from the kubelet, not loopback only
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and "GET" in routes[path], probe
        assert ports.get(get["port"], get["port"]) == args.port, probe
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert "GET" in routes[ann["prometheus.io/path"]] and int(ann["prometheus.io/port"]) == args.port
    svc = _one("Service")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert all(p["targetPort"] in ports or p["targetPort"] == args.port for p in svc["spec"]["ports"])
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]


def test_resources_cover_the_kv_cache_budget() -> None:
    from qwenkit.engine.kv_cache import parse_memory

    c = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = _serve_args(c["args"])
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}

    def quantity(q: str) -> int:
        m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", q)
        assert m, f"memory quantity {q!r}"
        return int(m.group(1)) * units[m.group(2)]

    req, lim = quantity(c["resources"]["requests"]["memory"]), quantity(c["resources"]["limits"]["memory"])
    # The KV pool is allocated up front; weights + runtime need at least 1 GiB more (deployment.yaml).
    assert req >= parse_memory(args.kv_cache_memory) + 2**30 and lim >= req
    assert int(c["resources"]["requests"]["cpu"]) >= args.threads


def test_adapter_rules_name_series_that_the_metrics_endpoint_exports() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from qwenkit.serve.engine_client import EngineStats
    from qwenkit.serve.metrics import ServerMetrics

    m = ServerMetrics("m", lambda: EngineStats())
    m.observe_finished(prompt_tokens=3, completion_tokens=2, finish_reasons=["stop"], ttft=0.1, e2e=0.2)
    exported = {s.name for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples}
    rules = yaml.safe_load(_one("ConfigMap")["data"]["config.yaml"])["rules"]
    adapter_names = set()
    for rule in rules:
        series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"]).group(0)
        assert series in exported, f"{series} is not in /metrics: {sorted(exported)}"
        assert re.fullmatch(rule["name"]["matches"], series)
        assert {"namespace", "pod"} <= rule["resources"]["overrides"].keys()
        adapter_names.add(rule["name"]["as"])
    hpa_names = {x["pods"]["metric"]["name"] for x in _one("HorizontalPodAutoscaler")["spec"]["metrics"]}
    assert hpa_names and hpa_names <= adapter_names


def test_dockerfile_serves_the_default_port_with_a_health_check() -> None:
    instr = _dockerfile()
    get = lambda name: [v for k, v in instr if k == name]  # noqa: E731
    assert re.match(r"python:3\.\d+-slim", get("FROM")[0])
    assert any("torch==2.13.0" in r and "whl/cpu" in r for r in get("RUN"))
    assert json.loads(get("ENTRYPOINT")[0]) == ["qwenkit", "serve"]
    args = _serve_args(json.loads(get("CMD")[0]))
    assert args.host == "0.0.0.0" and int(get("EXPOSE")[0]) == args.port
    health = get("HEALTHCHECK")[0]
    url = re.search(r"http://[^'\" ]+", health).group(0)
    assert url == f"http://127.0.0.1:{args.port}/health" and "GET" in _routes()["/health"]
    assert shlex.split(health)[0].startswith("--interval")
