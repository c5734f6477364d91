"""The keeper and the rest of the coordinator agree, end to end on real
reference worker managers: a plain ``apply restart`` of a deployed model
leaves it where it is, and a worker paused (SIGSTOP) for a few seconds — a
blip — is dropped from the routes at once but not replaced, while a killed
one (SIGKILL: connection refused) is replaced at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

import coordinator
from coordinator.core.deployments import Deployment
from tests.conftest import wait_until

pytestmark = pytest.mark.ray

FAST = {
    "timeouts": {"apply": 10, "connect": 1, "startup": 10, "shutdown": 10, "supports": 5, "rollout_health": 10},
    "backoff": {"initial": 0.1, "maximum": 0.5},
    "long_poll_timeout": 2,
    "reconcile": {"resync_interval": 1, "backoff_initial": 0.5, "backoff_max": 4, "appear_within": 10,
                  "replace_after": 8},
}
EMBEDDED = {"kind": "embedded", "name": "reg", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 20}
SIM = {"provider": "proxy/sim"}


@pytest.fixture
def cluster(ray_session, request):
    c = coordinator.start({"registries": [EMBEDDED], **FAST}, name=f"agree-{request.node.name[:20]}",
                          namespace="tests")
    yield c
    c.stop()


def journal(port: int) -> list[dict]:
    return httpx.get(f"http://127.0.0.1:{port}/api/_reference/journal", timeout=5).json()


def calls(port: int, path: str, model: str) -> int:
    return sum(1 for e in journal(port) if e["path"] == path and json.loads(e["body"]).get("model") == model)


def ready(cluster: coordinator.Cluster, key: str) -> list[int]:
    [st] = [s for s in cluster.deployments() if s.key == key]
    return sorted(int(i.rsplit(":", 1)[1]) for i in st.instances) if st.state == "ready" else []


def test_a_plain_restart_of_a_deployed_model_leaves_it_where_it_is(cluster, worker_process):
    url = cluster.registry_url()
    workers = [worker_process(controller=url, heartbeat_interval=1, start_delay=1.5) for _ in range(2)]
    cluster.wait_for("WorkerManager", count=2, worker_type="service", timeout=20)
    cluster.deploy(Deployment(model="embed", worker_type="text2vec", replicas=1, params=SIM), wait=True, timeout=30)
    [home] = ready(cluster, "embed@text2vec")
    other = next(w.port for w in workers if w.port != home)

    result = cluster.apply("embed", "restart", worker_type="text2vec")
    assert result.output.success, result.output.message
    wait_until(lambda: ready(cluster, "embed@text2vec") == [home], timeout=20, what="back on its manager")
    # A witness round: a new generation that asks for nothing; once a round has
    # run at it and found the deployment ready, any start the restart had
    # provoked would be in the journals.
    cluster.deploy(Deployment(model="embed", worker_type="text2vec", replicas=1, params=SIM, max_unavailable=2),
                   wait=True, timeout=30)
    assert calls(other, "/api/worker/models/startup", "embed") == 0, "a copy was started on the other manager"
    assert calls(home, "/api/worker/models/startup", "embed") == 1  # the deployment's own start, nothing more
    [st] = cluster.deployments()
    assert not [e for e in st.events if e.action in ("start", "stop", "apply start")][1:], st.events


def test_a_paused_worker_is_not_replaced_but_a_killed_one_is(cluster, worker_process):
    url = cluster.registry_url()
    workers = {w.port: w for w in (worker_process(controller=url, heartbeat_interval=1) for _ in range(3))}
    cluster.wait_for("WorkerManager", count=3, worker_type="service", timeout=20)
    cluster.deploy(Deployment(model="chat", replicas=2, params=SIM), wait=True, timeout=30)
    placed = ready(cluster, "chat@llm")
    [spare] = set(workers) - set(placed)
    paused = placed[0]

    failures: list[str] = []
    sent = [0]
    stop = threading.Event()

    def load() -> None:
        async def one(manager: coordinator.RayWorkerManager) -> None:
            out = await manager.generate({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
            sent[0] += 1
            if out.error_code:
                failures.append(out.text)

        async def run() -> None:  # open loop: a request every 50 ms, whatever the others do
            manager = coordinator.RayWorkerManager(cluster)
            tasks = set()
            while not stop.is_set():
                task = asyncio.create_task(one(manager))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks)
        asyncio.run(run())

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        wait_until(lambda: sent[0] >= 10, timeout=20, what="load running")
        os.kill(workers[paused].proc.pid, signal.SIGSTOP)
        try:
            # The route goes at once (the probes find no answer) ...
            wait_until(lambda: paused not in [i.port for i in cluster.instances("chat", healthy_only=True)],
                       timeout=10, what="the paused worker out of the routes")
            before = sent[0]
            wait_until(lambda: sent[0] >= before + 10, timeout=10, what="requests served by the other replica")
        finally:
            os.kill(workers[paused].proc.pid, signal.SIGCONT)
        # ... but no model load starts elsewhere for a blip.
        wait_until(lambda: ready(cluster, "chat@llm") == placed, timeout=15, what="the paused replica back")
        assert calls(spare, "/api/worker/models/startup", "chat") == 0
        assert failures == [], failures  # requests in flight on it waited for it; none failed

        # A SIGKILL is certain (connection refused): replaced at once, not after replace_after (8 s).
        killed_at = time.monotonic()
        workers[paused].kill()
        wait_until(lambda: calls(spare, "/api/worker/models/startup", "chat") == 1, timeout=7,
                   what="the killed replica replaced on the spare before replace_after")
        assert time.monotonic() - killed_at < FAST["reconcile"]["replace_after"]
    finally:
        stop.set()
        loader.join(timeout=10)
