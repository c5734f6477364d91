"""Demand, end to end: a deployment that autoscales from zero. The first
request for it is held by its caller's router (counted as queued in the
load reports — the demand that starts a replica), answered once the keeper
has started one (a model that takes ``load_s`` to load), and the deployment
goes back to zero once idle. Real reference workers, real Ray."""

from __future__ import annotations

import asyncio
import time

import pytest

import coordinator
from coordinator.core.autoscale import Autoscale
from tests.conftest import wait_until
from tests.test_traffic import FAST, SLOW_HEARTBEATS

pytestmark = pytest.mark.ray

SIM = {"provider": "proxy/sim"}
LOAD_S = 2.0


def ready_instances(cluster: coordinator.Cluster, model: str) -> int:
    return sum(1 for r in cluster.status().instances if r.model == model and r.healthy and r.reachable)


def test_a_deployment_scales_from_zero_on_its_first_request_and_back_to_zero_when_idle(ray_session, worker_process):
    cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST, "drain": {"grace": 0},
                                 "caller": {"report_every": 0.5, "report_ttl": 2}},
                                name="demand", namespace="tests")
    try:
        url = cluster.registry_url()
        for _ in range(2):
            worker_process(controller=url, heartbeat_interval=1, load_s=LOAD_S)
        wait_until(lambda: sum(1 for r in cluster.status().instances if r.worker_type == "service") == 2,
                   timeout=30, what="2 worker managers")
        policy = Autoscale(min_replicas=0, max_replicas=2, target_in_flight=2, upscale_delay_s=0,
                           downscale_delay_s=2, downscale_to_zero_delay_s=4, from_zero_timeout_s=30)
        cluster.deploy(coordinator.Deployment(model="cold", replicas=0, params=SIM, autoscale=policy))
        assert ready_instances(cluster, "cold") == 0

        async def first_request() -> tuple[float, coordinator.ModelOutput]:
            manager = coordinator.RayWorkerManager(cluster)
            started = time.monotonic()
            try:
                asked = asyncio.create_task(
                    manager.generate({"model": "cold", "messages": [{"role": "human", "content": "hi"}]}))
                # While it is held, the coordinator sees it waiting (status, CLI, gauge).
                seen = False
                while not asked.done() and not seen:
                    seen = (await cluster.aio.status()).waiting == {"cold@llm": 1}
                    await asyncio.sleep(0.05)
                answer = await asked
                assert seen, "the held request was never seen waiting"
                return time.monotonic() - started, answer
            finally:
                await manager.aclose()

        took, answer = asyncio.run(first_request())
        assert answer.error_code == 0 and "cold answers: hi" in answer.text, answer.text
        # Held while a replica started: its load, the probes and the route table — not the hold's 30 s.
        assert LOAD_S <= took < LOAD_S + 10, took
        [status] = [d for d in cluster.deployments() if d.key == "cold@llm"]
        assert any(e.action == "autoscale" and "0 -> 1" in e.message for e in status.events), status.events

        # Idle: back to zero after downscale_to_zero_delay_s.
        wait_until(lambda: ready_instances(cluster, "cold") == 0, timeout=30, what="scaled back to zero")
        [status] = [d for d in cluster.deployments() if d.key == "cold@llm"]
        assert status.replicas == 0

        # A model that does not scale from zero still fails at once.
        async def unknown() -> float:
            manager = coordinator.RayWorkerManager(cluster)
            started = time.monotonic()
            out = await manager.generate({"model": "nowhere", "messages": [{"role": "human", "content": "x"}]})
            await manager.aclose()
            assert out.error_code and "Cound not found worker instances" in out.text
            return time.monotonic() - started

        assert asyncio.run(unknown()) < 5
    finally:
        cluster.stop(forget=True)


@pytest.mark.anyio
async def test_the_gateway_answers_a_model_still_scaling_from_zero_with_503_and_retry_after():
    from coordinator.driver.worker_manager import NoInstanceError
    from tests.test_gateway_app import CHAT, FakeFleet, app

    fleet = FakeFleet()
    fleet.fail = NoInstanceError("chat@llm: no instance ready within 30 s of asking for one", retry_after=5)
    async with app(fleet) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert "no instance ready within 30 s" in r.json()["error"]["message"]
