"""Against DB-GPT 0.8.2 itself: the embedded registry as a drop-in for DB-GPT's
controller — real DB-GPT worker managers register and heartbeat with it, the
coordinator dispatches to them, and DB-GPT's own ``RemoteWorkerManager`` (the
component this project replaces), reading it through DB-GPT's
``ModelRegistryClient``, sees what the coordinator sees."""

from __future__ import annotations

import json
from datetime import datetime

import httpx
import pytest

import coordinator
from tests.conftest import free_port, wait_until
from tests.dbgpt_env import original_manager, start_worker_manager

pytestmark = [pytest.mark.ray, pytest.mark.dbgpt]

MODEL = "chatgpt-test"


@pytest.fixture(scope="module")
def embedded_fleet(ray_session, dbgpt_bin, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dbgpt-embedded")
    cluster = coordinator.start(
        {
            "registries": [{"kind": "embedded", "name": "main", "port": 0, "heartbeat_interval": 1}],
            "timeouts": {"apply": 30, "connect": 2},
        },
        name="interop-embedded", namespace="tests",
    )
    workers = []
    try:
        url = cluster.registry_url()
        workers += [start_worker_manager(dbgpt_bin, free_port(), url, workdir) for _ in range(2)]
        # DB-GPT may register the model before the worker manager itself.
        cluster.wait_for("WorkerManager", count=2, worker_type="service", timeout=60)
        cluster.wait_for(MODEL, count=2, timeout=60)
        yield cluster, url, workers
    finally:
        for proc in workers:
            proc.kill()
        cluster.stop()


def heartbeats(url: str, key: str) -> dict[int, datetime]:
    rows = httpx.get(f"{url}/api/controller/models", params={"model_name": key}, timeout=5).json()
    return {r["port"]: datetime.fromisoformat(r["last_heartbeat"]) for r in rows}


def test_dbgpt_workers_register_with_the_embedded_registry(embedded_fleet):
    cluster, _, workers = embedded_fleet
    ports = sorted(w.port for w in workers)
    assert sorted(i.port for i in cluster.instances("WorkerManager", "service")) == ports
    assert sorted(i.port for i in cluster.instances(MODEL)) == ports


def test_dbgpt_workers_heartbeat_to_the_embedded_registry(embedded_fleet):
    _, url, workers = embedded_fleet
    first = heartbeats(url, f"{MODEL}@llm")
    assert sorted(first) == sorted(w.port for w in workers)
    wait_until(
        lambda: all(beat > first[port] for port, beat in heartbeats(url, f"{MODEL}@llm").items()),
        timeout=10, what="every DB-GPT worker's last_heartbeat advanced",
    )


def test_coordinator_dispatches_to_dbgpt_workers_found_in_the_embedded_registry(embedded_fleet):
    cluster, _, workers = embedded_fleet
    result = cluster.apply(MODEL, "restart")
    assert sorted(o.port for o in result.outputs) == sorted(w.port for w in workers)
    for out in result.outputs:
        assert out.success, out.message
        # DB-GPT's words, then the drain's (this test's reads of the registry count as a reader's).
        words, _, drained = out.message.partition(" (drained in ")
        assert words == f"model {MODEL}@proxy/openai(127.0.0.1:{out.port}) start successfully"
        assert drained.endswith(" s, 0 in flight)")


def test_dbgpts_own_remote_worker_manager_sees_what_the_coordinator_sees(embedded_fleet, dbgpt_bin):
    cluster, url, _ = embedded_fleet
    cluster.wait_for(MODEL, count=2, timeout=30)  # the restart above re-registered them
    seen = json.loads(original_manager(dbgpt_bin, url, MODEL, "restart"))
    ours = lambda *a: sorted(f"{i.host}:{i.port}" for i in cluster.instances(*a))  # noqa: E731
    assert seen["managers"] == ours("WorkerManager", "service")
    assert seen["instances"] == seen["sync_instances"] == ours(MODEL)
    assert len(seen["instances"]) == 2
    # The original's worker_apply works through our registry (and, as docs/protocol.md
    # says, returns only the first worker's output).
    assert seen["apply"]["success"] is True
    assert seen["apply"]["message"].endswith("start successfully")
