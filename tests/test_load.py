"""Under load nothing is lost: every call returns, outputs add up to calls ×
instances, every injected failure is accounted for, and operations on one model
stay serialised while different models overlap."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
import ray

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings

pytestmark = pytest.mark.ray

WORKERS = 8
MODELS = [f"load-{i}" for i in range(4)]
CALLS = 500
DRIVERS = 10


@pytest.fixture(scope="module")
def fleet(ray_session):
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 5}],
         "timeouts": {"apply": 30, "connect": 2}},
        name="load", namespace="tests",
    )
    host = ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote()
    url = cluster.registry_url()
    ports = ray.get([
        host.add.remote(WorkerSettings(controller=url, heartbeat_interval=1,
                                       models=[SimModel(name=m) for m in MODELS]))
        for _ in range(WORKERS)
    ])
    for model in MODELS:
        cluster.wait_for(model, count=WORKERS, timeout=60)
    assert cluster.apply(MODELS[0], "start").success  # every proxy is up
    yield cluster, host, ports
    ray.get(host.stop_all.remote())
    ray.kill(host)
    cluster.stop()


def test_500_applies_from_concurrent_drivers_lose_nothing(fleet):
    cluster, host, ports = fleet
    injected = {ports[0]: 5, ports[3]: 4}
    for port, n in injected.items():
        ray.get(host.set_faults.remote(port, fail_next=n))
    marks = {p: len(ray.get(host.journal.remote(p))) for p in ports}
    plan = list(zip(itertools.islice(itertools.cycle(MODELS), CALLS),
                    itertools.islice(itertools.cycle(["start", "restart", "update_params"]), CALLS)))
    queue: asyncio.Queue = asyncio.Queue()
    results: list[coordinator.ApplyResult] = []

    async def driver() -> None:
        while not queue.empty():
            model, kind = queue.get_nowait()
            results.append(await cluster.aio.apply(model, kind, params={"n": len(results)}))
            if len(results) == CALLS // 2:  # a fault injected half-way through
                await host.set_faults.remote(ports[5], fail_next=3)
                injected[ports[5]] = 3

    async def run() -> None:
        for item in plan:
            queue.put_nowait(item)
        async with asyncio.TaskGroup() as tg:
            for _ in range(DRIVERS):
                tg.create_task(driver())

    asyncio.run(run())

    assert len(results) == CALLS
    outputs = [o for r in results for o in r.outputs]
    assert len(outputs) == CALLS * WORKERS
    failed = [o for o in outputs if not o.success]
    assert sorted(o.port for o in failed) == sorted(p for p, n in injected.items() for _ in range(n))
    assert all("HTTP 500: Internal Server Error" in o.message for o in failed)
    assert sum(not r.success for r in results) == len({id(r) for r in results if not r.success})

    # Serialised per model: no worker ever saw two applies to one model at once,
    # and every worker saw each model's applies in the same order...
    per_worker_order = {}
    for port in ports:
        peaks, total = ray.get(host.peaks.remote(port))
        assert all(v == 1 for v in peaks.values()), peaks
        entries = ray.get(host.journal.remote(port))[marks[port]:]
        bodies = [json.loads(e["body"]) for e in entries if e["path"] == "/api/worker/apply"]
        per_worker_order[port] = {m: [b["params"]["n"] for b in bodies if b["model"] == m] for m in MODELS}
    first = per_worker_order[ports[0]]
    assert all(order == first for order in per_worker_order.values())
    assert sum(len(v) for v in first.values()) == CALLS
    # ...while different models did run at the same time.
    assert max(ray.get(host.peaks.remote(p))[1] for p in ports) > 1


def test_concurrent_startup_and_shutdown_of_different_models(fleet):
    cluster, _, ports = fleet
    reqs = [
        coordinator.WorkerStartupRequest(host="127.0.0.1", port=port, model=f"extra-{i}", worker_type="llm",
                                         params={"provider": "proxy/openai"})
        for i, port in enumerate(ports)
    ]

    async def all_of(op: str) -> list[coordinator.WorkerApplyOutput]:
        call = getattr(cluster.aio, op)
        return list(await asyncio.gather(*(call(r) for r in reqs)))

    started = asyncio.run(all_of("startup"))
    assert [o.success for o in started] == [True] * WORKERS
    assert [o.port for o in started] == ports
    for i in range(WORKERS):
        cluster.wait_for(f"extra-{i}", count=1, timeout=20)
    stopped = asyncio.run(all_of("shutdown"))
    assert [o.success for o in stopped] == [True] * WORKERS
