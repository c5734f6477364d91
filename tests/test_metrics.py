"""The coordinator's metrics reach Ray's Prometheus endpoint."""

from __future__ import annotations

import re

import httpx
import pytest
import ray

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.ray


def scrape() -> str:
    port = ray.nodes()[0]["MetricsExportPort"]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def sample(text: str, name: str, **tags: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_operations_latency_live_instances_and_probe_failures_are_exported(ray_session):
    closed = free_port()
    cluster = coordinator.start(
        {"registries": [
            {"kind": "embedded", "name": "reg", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3},
            {"kind": "static", "name": "ghost", "instances": [
                {"model_name": "metric-model@llm", "host": "127.0.0.1", "port": closed, "healthy": True}]},
        ], "timeouts": {"apply": 5, "connect": 1}},
        name="metrics", namespace="tests",
    )
    host = ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote()
    try:
        ray.get(host.add.remote(WorkerSettings(controller=cluster.registry_url(), heartbeat_interval=1,
                                               models=[SimModel(name="metric-model")])))
        cluster.wait_for("metric-model", count=1, timeout=30)
        assert not cluster.apply("metric-model", "start").success  # the ghost fails
        with pytest.raises(coordinator.NoInstancesError):
            cluster.apply("nothing", "start")
        cluster.deploy(coordinator.Deployment(model="metric-kept", replicas=1, params={"provider": "proxy/sim"}),
                       wait=True, timeout=30)

        expected = [
            ("ray_coordinator_operations_total", {"operation": "apply", "outcome": "error"}),
            ("ray_coordinator_operations_total", {"operation": "apply", "outcome": "failure"}),
            ("ray_coordinator_instance_operation_seconds_count", {"operation": "apply"}),
            ("ray_coordinator_live_instances", {"model": "metric-model@llm", "health": "healthy"}),
            ("ray_coordinator_probe_failures_total", {}),
            ("ray_coordinator_probe_failing", {"endpoint": f"127.0.0.1:{closed}"}),
            ("ray_coordinator_watcher_stale", {"source": "reg"}),
            ("ray_coordinator_deployment_replicas", {"deployment": "metric-kept@llm", "kind": "ready"}),
            ("ray_coordinator_deployment_failing", {"deployment": "metric-kept@llm"}),
            ("ray_coordinator_reconcile_actions_total", {"action": "start", "outcome": "success"}),
        ]

        def exported() -> str | None:
            text = scrape()
            return text if all(sample(text, name, **tags) is not None for name, tags in expected) else None

        text = wait_until(exported, timeout=90, interval=1, what="every metric exported")
        assert sample(text, "ray_coordinator_operations_total", operation="apply", outcome="failure") >= 1
        assert sample(text, "ray_coordinator_instance_operation_seconds_count", operation="apply") >= 1
        assert sample(text, "ray_coordinator_live_instances", model="metric-model@llm", health="healthy") == 1
        assert sample(text, "ray_coordinator_probe_failures_total") >= 1
        assert sample(text, "ray_coordinator_probe_failing", endpoint=f"127.0.0.1:{closed}") >= 1
        assert sample(text, "ray_coordinator_watcher_stale", source="reg") == 0
        assert re.search(r'ray_coordinator_live_instances\{[^}]*health="unreachable"', text)
        assert sample(text, "ray_coordinator_deployment_replicas", deployment="metric-kept@llm", kind="desired") == 1
        assert sample(text, "ray_coordinator_deployment_failing", deployment="metric-kept@llm") == 0
        assert sample(text, "ray_coordinator_reconcile_actions_total", action="start", outcome="success") >= 1
    finally:
        ray.get(host.stop_all.remote())
        ray.kill(host)
        cluster.stop(forget=True)


def test_grafana_dashboard_plots_every_exported_metric():
    import json

    from coordinator.plumbing import metrics
    from tests.conftest import ROOT

    dash = json.loads((ROOT / "examples" / "grafana_dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    names = re.findall(r"^\| (coordinator_\w+) \|", metrics.__doc__, flags=re.M)
    assert len(names) == 23
    for name in names:
        assert f"ray_{name}" in exprs, name


def test_grafana_dashboard_names_only_metrics_the_code_defines():
    """Every ``ray_coordinator_*`` name a panel asks for is one the code makes
    (a histogram's ``_bucket`` / ``_count`` / ``_sum`` series included), and
    the table in metrics.py lists exactly what the code makes."""
    import inspect
    import json

    from coordinator.plumbing import metrics
    from tests.conftest import ROOT

    made = set(re.findall(r'"(coordinator_\w+)"', inspect.getsource(metrics)))
    histograms = set(re.findall(r'Histogram\(\s*"(coordinator_\w+)"', inspect.getsource(metrics)))
    assert histograms and histograms <= made
    assert made == set(re.findall(r"^\| (coordinator_\w+) \|", metrics.__doc__, flags=re.M))
    dash = json.loads((ROOT / "examples" / "grafana_dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), ids
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"ray_(coordinator_\w+)", target["expr"]):
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                assert name in made or base in histograms, (panel["title"], name)


def test_a_retired_endpoints_series_leaves_the_metrics(ray_session):
    """Per-endpoint metrics are gauges re-reported while the proxy lives: once
    an endpoint leaves every registry and its proxy is retired, its series
    ages out of Ray's exporter instead of staying for the life of the node."""
    closed = free_port()
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "name": "reg", "port": 0}]}, name="metrics-retire", namespace="tests")
    try:
        url = cluster.registry_url()
        entry = {"model_name": "gone@llm", "host": "127.0.0.1", "port": closed, "check_healthy": False}
        httpx.post(f"{url}/api/controller/models", json=entry).raise_for_status()
        endpoint = f"127.0.0.1:{closed}"
        wait_until(lambda: (sample(scrape(), "ray_coordinator_probe_failing", endpoint=endpoint) or 0) >= 1,
                   timeout=90, interval=1, what="the endpoint's series exported")
        httpx.delete(f"{url}/api/controller/models", params={
            "model_name": "gone@llm", "host": "127.0.0.1", "port": closed, "remove_from_registry": "true",
        }).raise_for_status()
        wait_until(lambda: sample(scrape(), "ray_coordinator_probe_failing", endpoint=endpoint) is None,
                   timeout=120, interval=2, what="the retired endpoint's series gone")
    finally:
        cluster.stop()
