"""Deployments end to end: real reference worker managers (processes), a real
coordinator on a local Ray, real kills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import ray

import coordinator
from coordinator.core.deployments import Deployment
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.ray

FAST = {
    "timeouts": {"apply": 10, "connect": 1, "startup": 10, "shutdown": 10, "supports": 5, "rollout_health": 10},
    "backoff": {"initial": 0.1, "maximum": 0.5},
    "long_poll_timeout": 2,
    "reconcile": {"resync_interval": 2, "backoff_initial": 0.5, "backoff_max": 4, "appear_within": 10},
}
EMBEDDED = {"kind": "embedded", "name": "reg", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3}
SIM = {"provider": "proxy/sim"}


@pytest.fixture
def clusters(ray_session):
    started: list[coordinator.Cluster] = []

    def make(name: str, **extra) -> coordinator.Cluster:
        cluster = coordinator.start({"registries": [EMBEDDED], **FAST, **extra}, name=name, namespace="tests")
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.stop(forget=True)


def journal(port: int) -> list[dict]:
    return httpx.get(f"http://127.0.0.1:{port}/api/_reference/journal", timeout=5).json()


def startups(port: int, model: str) -> int:
    return sum(1 for e in journal(port)
               if e["path"] == "/api/worker/models/startup" and json.loads(e["body"])["model"] == model)


def ready_ports(cluster: coordinator.Cluster, key: str) -> list[int]:
    [st] = [s for s in cluster.deployments() if s.key == key]
    return sorted(int(i.rsplit(":", 1)[1]) for i in st.instances) if st.state == "ready" else []


def test_a_deployment_is_placed_spread_healed_and_scaled(clusters, worker_process):
    cluster = clusters("deploy-heal")
    url = cluster.registry_url()
    managers = {w.port: w for w in (worker_process(controller=url, heartbeat_interval=1) for _ in range(3))}
    cluster.wait_for("WorkerManager", count=3, worker_type="service", timeout=20)

    [gen] = cluster.deploy(Deployment(model="keep", replicas=2, params=SIM), wait=True, timeout=30)
    assert gen == 1
    [st] = cluster.deployments()
    assert (st.state, st.ready, st.replicas, st.observed_generation) == ("ready", 2, 2, 1)
    first = ready_ports(cluster, "keep@llm")
    assert len(set(first)) == 2  # two managers, one replica each
    assert cluster.deploy(Deployment(model="keep", replicas=2, params=SIM)) == [1]  # same spec, same generation

    # A worker manager dies: the replacement runs on the third one.
    victim = first[0]
    managers[victim].kill()
    spare = (set(managers) - set(first)).pop()
    wait_until(lambda: ready_ports(cluster, "keep@llm") == sorted([first[1], spare]), timeout=20,
               what="the replacement ready on the spare manager")
    [st] = cluster.deployments()
    assert any(e.action == "start" and e.endpoint.endswith(f":{spare}") and e.ok and "not ready" in e.reason
               for e in st.events), st.events

    # It comes back, with the model: one too many, and the rule scales back to 2.
    managers[victim] = worker_process("keep@llm", controller=url, heartbeat_interval=1, port=victim)
    wait_until(lambda: any(e.action == "stop" and e.ok for e in cluster.deployments()[0].events), timeout=20,
               what="the extra replica stopped")
    wait_until(lambda: len(ready_ports(cluster, "keep@llm")) == 2, timeout=20)
    assert len(cluster.instances("keep")) == 2

    # An imperative shutdown of a deployed model: the desired state wins.
    target = ready_ports(cluster, "keep@llm")[0]
    out = cluster.shutdown({"host": "127.0.0.1", "port": target, "model": "keep", "worker_type": "llm"})
    assert out.success
    wait_until(lambda: len(ready_ports(cluster, "keep@llm")) == 2, timeout=20, what="the stopped replica back")

    # New params roll through the instances, one at a time (max_unavailable=1).
    [gen] = cluster.deploy(Deployment(model="keep", replicas=2, params={**SIM, "temperature": 0.2}),
                           wait=True, timeout=30)
    assert gen == 2
    # deploy(wait) returns once a roll whose every output succeeded has been
    # booked: each replica's update_params was journalled on arrival before
    # that. Every manager's journal is read, not only those of the instances
    # listed ready afterwards: that list is empty while the state is not
    # "ready", and the state can leave "ready" for a moment after the return —
    # the coordinator's copy of the registry lags, and a listing from during
    # the roll (the instance drained, so unhealthy) can arrive after the
    # roll's health gate has passed.
    updates = sorted((e["t"], e["t_end"], p) for p in managers for e in journal(p)
                     if e["path"] == "/api/worker/apply" and json.loads(e["body"])["model"] == "keep"
                     and json.loads(e["body"])["apply_type"] == "update_params")
    assert len(updates) == 2, (updates, cluster.deployments())
    assert updates[0][2] != updates[1][2], updates  # one per replica
    assert updates[0][1] <= updates[1][0], updates  # the second began after the first ended
    [st] = cluster.deployments()
    assert any(e.action == "update_params" and e.ok for e in st.events)

    # Scale down, then undeploy with shutdown: nothing of it keeps running.
    assert cluster.deploy(Deployment(model="keep", replicas=1, params={**SIM, "temperature": 0.2}),
                          wait=True, timeout=30) == [3]
    assert len(cluster.instances("keep")) == 1
    last = cluster.undeploy("keep", shutdown=True)
    assert last.replicas == 0
    wait_until(lambda: cluster.instances("keep") == [], timeout=10)
    assert cluster.deployments() == []
    with pytest.raises(coordinator.NotDeployedError, match="keep@llm"):
        cluster.undeploy("keep")


def test_a_killed_coordinator_mid_reconcile_starts_no_duplicates(clusters, worker_process):
    cluster = clusters("deploy-restart")
    url = cluster.registry_url()
    ports = [worker_process(controller=url, heartbeat_interval=1, start_delay=8).port for _ in range(4)]
    cluster.wait_for("WorkerManager", count=4, worker_type="service", timeout=20)

    cluster.deploy(Deployment(model="once", replicas=2, params=SIM))
    wait_until(lambda: sum(startups(p, "once") for p in ports) == 2, timeout=15, what="both starts sent")
    coord = ray.get_actor("deploy-restart", namespace="tests")
    ray.kill(coord, no_restart=False)  # while both starts take their 8 s: longer than a restart

    # The restarted coordinator reads the starts it had sent, and waits for them.
    wait_until(lambda: len(ready_ports(cluster, "once@llm")) == 2, timeout=30, what="ready after the restart")
    # A witness that the restarted coordinator has reconciled since: a new
    # generation that asks for no action (max_unavailable matters only to a
    # params roll) is observed by a round, and deploy(wait) returns once that
    # round has ended with the deployment ready. A round that was going to
    # send a duplicate start sent it then (journalled on arrival).
    assert cluster.deploy(Deployment(model="once", replicas=2, params=SIM, max_unavailable=2),
                          wait=True, timeout=30) == [2]
    assert sum(startups(p, "once") for p in ports) == 2
    assert len(cluster.instances("once")) == 2


def test_a_failing_startup_backs_off_and_says_why(clusters, worker_process):
    cluster = clusters("deploy-fail")
    url = cluster.registry_url()
    ports = [worker_process(controller=url, heartbeat_interval=1).port for _ in range(2)]
    cluster.wait_for("WorkerManager", count=2, worker_type="service", timeout=20)

    cluster.deploy(Deployment(model="broken", replicas=1, params={"provider": "no/such-provider"}))
    wait_until(lambda: cluster.deployments()[0].state == "failing", timeout=15, what="state failing")
    window_start = sum(startups(p, "broken") for p in ports)
    time.sleep(8)
    attempts = sum(startups(p, "broken") for p in ports) - window_start
    # Backing off 0.5, 1, 2, 4, 4 s per manager: a handful in 8 s, not hundreds.
    assert 1 <= attempts <= 10, attempts
    [st] = cluster.deployments()
    assert st.state == "failing" and st.ready == 0
    assert "500" in st.last_error and "Internal Server Error" in st.last_error, st.last_error
    with pytest.raises(coordinator.DeploymentNotReadyError, match="failing"):
        cluster.deploy(Deployment(model="broken", replicas=1, params={"provider": "no/such-provider"}),
                       wait=True, timeout=3)


DRIVER = """
import sys, coordinator
from coordinator.core.deployments import Deployment
cluster = coordinator.attach("deploy-detached", namespace="tests")
cluster.deploy(Deployment(model="kept", replicas=1, params={"provider": "proxy/sim"}), wait=True, timeout=30)
print("deployed")
"""


def test_a_detached_coordinator_keeps_reconciling_after_the_driver_exits(ray_session, worker_process):
    cluster = coordinator.start({"registries": [EMBEDDED], **FAST}, name="deploy-detached", namespace="tests",
                                detached=True)
    try:
        url = cluster.registry_url()
        workers = {w.port: w for w in (worker_process(controller=url, heartbeat_interval=1) for _ in range(2))}
        cluster.wait_for("WorkerManager", count=2, worker_type="service", timeout=20)
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
        done = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and "deployed" in done.stdout, done.stderr[-2000:]
        # The driver is gone; a worker dies; the coordinator still heals.
        [first] = ready_ports(cluster, "kept@llm")
        workers[first].kill()
        [other] = set(workers) - {first}
        wait_until(lambda: ready_ports(cluster, "kept@llm") == [other], timeout=20, what="healed without a driver")
    finally:
        cluster.stop(forget=True)


def test_a_manager_restarted_without_the_model_gets_it_again(clusters, worker_process):
    cluster = clusters("deploy-forgot")
    url = cluster.registry_url()
    pinned = worker_process(controller=url, heartbeat_interval=1)
    worker_process(controller=url, heartbeat_interval=1)  # eligible, but outside `hosts`
    cluster.wait_for("WorkerManager", count=2, worker_type="service", timeout=20)
    cluster.deploy(Deployment(model="pinned", replicas=1, params=SIM, hosts=[f"127.0.0.1:{pinned.port}"]),
                   wait=True, timeout=30)
    assert ready_ports(cluster, "pinned@llm") == [pinned.port]

    pinned.kill()
    wait_until(lambda: cluster.deployments()[0].state == "degraded", timeout=15, what="degraded: nowhere to go")
    assert "among hosts" in cluster.deployments()[0].last_error
    # DB-GPT forgets models it was told to start: the manager comes back empty.
    worker_process(controller=url, heartbeat_interval=1, port=pinned.port)
    wait_until(lambda: ready_ports(cluster, "pinned@llm") == [pinned.port], timeout=30,
               what="started again on the restarted manager")



def params_of(port: int, model: str) -> dict | None:
    """The params a reference worker holds for ``model``; None when it does
    not serve it (a shutdown drops it; a stopped one answers 500 too)."""
    got = httpx.get(f"http://127.0.0.1:{port}/api/worker/parameter/descriptions", params={"model": model},
                    timeout=5)
    if got.status_code == 500:
        return None
    got.raise_for_status()
    return {p["param_name"]: p["default_value"] for p in got.json()}


def test_params_deployed_back_mid_surge_leave_every_instance_on_them(clusters, worker_process):
    cluster = clusters("deploy-back")
    url = cluster.registry_url()
    low, high = sorted(worker_process(controller=url, heartbeat_interval=1, load_s=2).port for _ in range(2))
    cluster.wait_for("WorkerManager", count=2, worker_type="service", timeout=20)
    old, new = {**SIM, "temperature": 0.1}, {**SIM, "temperature": 0.9}
    # The old instance on the higher port: a plain scale-down would stop it, not the surge's.
    cluster.deploy(Deployment(model="back", replicas=1, max_surge=1, params=old, hosts=[f"127.0.0.1:{high}"]),
                   wait=True, timeout=30)
    assert ready_ports(cluster, "back@llm") == [high]
    cluster.deploy(Deployment(model="back", replicas=1, max_surge=1, params=new))
    wait_until(lambda: startups(low, "back") == 1, timeout=15, what="the surge's start sent")
    # Back to the old params while the surge's instance loads (2 s).
    cluster.deploy(Deployment(model="back", replicas=1, max_surge=1, params=old), wait=True, timeout=60)
    assert len(ready_ports(cluster, "back@llm")) == 1
    held = {p: params_of(p, "back") for p in (low, high)}
    assert [p for p in held.values() if p is not None] == [{**old, "name": "back"}], held
