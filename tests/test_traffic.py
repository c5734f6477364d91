"""Traffic: what the coordinator knows about liveness reaches requests — the
embedded registry's health, and RayWorkerManager's inference calls. Real
reference worker processes, real kills."""

from __future__ import annotations

import time

import httpx
import pytest

import coordinator
from tests.conftest import wait_until

pytestmark = pytest.mark.ray

FAST = {
    "timeouts": {"apply": 10, "connect": 1, "startup": 10, "shutdown": 10, "supports": 5},
    "backoff": {"initial": 0.1, "maximum": 0.5},
    "long_poll_timeout": 2,
}
# A heartbeat timeout far longer than the test: only the probes can be what marks a worker unhealthy.
SLOW_HEARTBEATS = {"kind": "embedded", "name": "reg", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 120}


@pytest.fixture
def clusters(ray_session):
    started: list[coordinator.Cluster] = []

    def make(name: str, **extra) -> coordinator.Cluster:
        cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST, **extra}, name=name,
                                    namespace="tests")
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.stop()


def probed(cluster: coordinator.Cluster, model: str, count: int) -> None:
    """Until ``count`` instances of ``model`` have been found reachable by their
    proxies (a new proxy takes a second or two to start probing)."""
    wait_until(lambda: sum(1 for r in cluster.status().instances if r.model == model and r.reachable) == count,
               timeout=30, what=f"{count} probed instances of {model}")


def listed(url: str, key: str, healthy_only: bool) -> dict[int, bool]:
    rows = httpx.get(f"{url}/api/controller/models", params={"model_name": key, "healthy_only": healthy_only},
                     timeout=5).json()
    return {r["port"]: r["healthy"] for r in rows}


def test_the_embedded_registry_lists_what_the_probes_find_dead_as_unhealthy(clusters, worker_process):
    cluster = clusters("traffic-registry")
    url = cluster.registry_url()
    survivor = worker_process("t@llm", controller=url, heartbeat_interval=1)
    victim = worker_process("t@llm", controller=url, heartbeat_interval=1)
    wait_until(lambda: len(listed(url, "t@llm", True)) == 2, timeout=20)
    probed(cluster, "t", 2)

    victim.kill()
    killed = time.monotonic()
    wait_until(lambda: listed(url, "t@llm", True) == {survivor.port: True}, timeout=5, interval=0.05,
               what="the dead worker out of healthy_only within 5 s")
    print(f"listed unhealthy {time.monotonic() - killed:.2f} s after the kill")
    assert listed(url, "t@llm", False) == {survivor.port: True, victim.port: False}
    assert listed(url, "WorkerManager@service", False)[victim.port] is False

    # A heartbeat (from anyone) does not revive what the probes find dead.
    dead = {"model_name": "t@llm", "host": "127.0.0.1", "port": victim.port, "healthy": True}
    assert httpx.post(f"{url}/api/controller/heartbeat", json=dead, timeout=5).status_code == 200
    time.sleep(1.5)  # a probe or two
    assert listed(url, "t@llm", True) == {survivor.port: True}

    # It answers again: healthy as soon as the probes see it.
    worker_process("t@llm", controller=url, heartbeat_interval=1, port=victim.port)
    wait_until(lambda: listed(url, "t@llm", True) == {survivor.port: True, victim.port: True}, timeout=10,
               what="healthy again once it answers")
