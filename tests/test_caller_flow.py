"""Flow control where Python callers send (``caller.flow``): one gate per
process and coordinator, shared by every ``RayWorkerManager`` and thread of
the process — a noisy tenant's callers cannot starve a quiet one's, sync and
async callers alike; limits refuse with ``OverloadedError`` and its
``retry_after``; and what waits in the gate is demand the coordinator counts
for the model, which an autoscaled deployment scales up for. Real reference
workers, real Ray."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import coordinator
from coordinator.core.autoscale import Autoscale
from tests.conftest import wait_until
from tests.test_traffic import FAST, SLOW_HEARTBEATS, clusters, probed  # noqa: F401 - the fixture

pytestmark = pytest.mark.ray

SIM = {"provider": "proxy/sim"}
#: Seconds every worker call takes (under the probes' 1 s timeout).
LATENCY = 0.3


def chat(text: str) -> dict:
    return {"model": "chat", "messages": [{"role": "human", "content": text}]}


def test_a_noisy_tenants_callers_cannot_starve_a_quiet_ones_through_one_process(clusters, worker_process):
    cluster = clusters("caller-flow-fair", caller={"flow": {"capacity": 1, "max_wait": 60}})
    worker_process("vec@text2vec", controller=cluster.registry_url(), heartbeat_interval=1, latency=LATENCY)
    probed(cluster, "vec", 1)
    noisy = coordinator.RayWorkerManager(cluster, tenant="noisy")
    quiet = coordinator.RayWorkerManager(cluster, tenant="quiet")
    done: list[str] = []
    lock = threading.Lock()

    async def scenario() -> None:
        async def noisy_call(i: int) -> None:  # async callers, on this loop
            assert len(await noisy.embeddings({"model": "vec", "input": [f"noisy {i}"]})) == 1
            with lock:
                done.append("noisy")

        def quiet_call() -> None:  # sync callers, each on a thread of its own (the manager's private loop)
            assert len(quiet.sync_embeddings({"model": "vec", "input": ["quiet"]})) == 1
            with lock:
                done.append("quiet")

        await asyncio.to_thread(quiet_call)  # both managers ready (config, connections) before the race
        await noisy_call(-1)
        done.clear()
        flood = [asyncio.create_task(noisy_call(i)) for i in range(12)]
        # The flood waits in the gate: the coordinator sees it waiting for the model.
        deadline = time.monotonic() + 10
        while (await cluster.aio.status()).waiting.get("vec@text2vec", 0) < 8:
            assert time.monotonic() < deadline, "the flood was never seen waiting"
            await asyncio.sleep(0.02)
        await asyncio.gather(*flood, asyncio.to_thread(quiet_call), asyncio.to_thread(quiet_call))

    try:
        asyncio.run(scenario())
        last_quiet = max(i for i, who in enumerate(done) if who == "quiet")
        # First come first served would run the quiet tenant's two after every noisy request
        # already waiting (8 or so); fair sharing runs them next, one noisy request between.
        assert done[last_quiet + 1:].count("noisy") >= 3, done
        wait_until(lambda: cluster.status().waiting == {}, timeout=10, what="no demand left")
    finally:
        asyncio.run(noisy.aclose())
        asyncio.run(quiet.aclose())


def test_limits_refuse_with_overloaded_error_and_retry_after(clusters, worker_process):
    cluster = clusters("caller-flow-limits", caller={"flow": {
        "capacity": 1, "max_queued": 2, "retry_after": 4, "max_wait": 30,
        "tenants": [{"name": "capped", "max_queued": 1}]}})
    worker_process("chat@llm", controller=cluster.registry_url(), heartbeat_interval=1, chunks=8, chunk_delay=0.5)
    probed(cluster, "chat", 1)
    free = coordinator.RayWorkerManager(cluster, tenant="free")
    capped = coordinator.RayWorkerManager(cluster, tenant="capped")
    other = coordinator.RayWorkerManager(cluster, tenant="other")
    greedy = coordinator.RayWorkerManager(cluster, tenant="capped", priority=5)
    managers = (free, capped, other, greedy)

    async def scenario() -> None:
        for manager in managers:  # ready (config, route table): not gated, a token count
            assert await manager.count_token({"model": "chat", "prompt": "one two"}) == 2
        started = asyncio.Event()

        async def hold() -> list[coordinator.ModelOutput]:  # a stream of 4 s holds the model's one place
            outputs = []
            async for output in free.generate_stream(chat("holder")):
                started.set()
                outputs.append(output)
            return outputs

        holder = asyncio.create_task(hold())
        await asyncio.wait_for(started.wait(), 10)
        waits = asyncio.create_task(capped.generate(chat("capped 1")))
        await asyncio.sleep(0.1)
        # The tenant's own limit: one of its requests waits already.
        with pytest.raises(coordinator.OverloadedError) as limit:
            await capped.routed_call("chat@llm", "POST", "/generate", json=chat("capped 2"))
        assert limit.value.reason == "tenant_limit" and limit.value.retry_after == 4
        assert limit.value.tenant == "capped" and "max_queued" in str(limit.value)
        # generate never raises: the same refusal is its error output.
        refused = await capped.generate(chat("capped 3"))
        assert refused.error_code == 1 and "its limit" in refused.text
        # The model's queue: two wait (max_queued 2); a third, of a tenant with as much of it, is refused.
        also_waits = asyncio.create_task(other.generate(chat("other 1")))
        await asyncio.sleep(0.1)
        with pytest.raises(coordinator.OverloadedError) as full:
            await other.routed_call("chat@llm", "POST", "/generate", json=chat("other 2"))
        assert full.value.reason == "queue_full" and "caller.flow.max_queued" in str(full.value)
        # A priority above the tenant's highest is a mistake, not a wait.
        with pytest.raises(coordinator.InferenceError, match="above tenant 'capped'"):
            await greedy.routed_call("chat@llm", "POST", "/generate", json=chat("greedy"))
        assert not holder.done(), "the holder ended before the limits were tried: nothing was tested"
        # What does not generate is not gated: a token count runs while the model's place is taken.
        assert await capped.count_token({"model": "chat", "prompt": "one two three"}) == 3
        streamed, *answers = await asyncio.gather(holder, waits, also_waits)
        assert streamed[-1].finish_reason == "stop"
        assert all(a.success for a in answers), [a.text for a in answers]

    try:
        asyncio.run(scenario())
    finally:
        for manager in managers:
            asyncio.run(manager.aclose())


def test_requests_waiting_under_flow_control_are_load_the_autoscaler_scales_up_for(ray_session, worker_process):
    cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST, "drain": {"grace": 0}, "caller": {
        "report_every": 0.5, "report_ttl": 2, "flow": {"capacity": 1, "max_wait": 60}}},
        name="caller-flow-demand", namespace="tests")
    manager = coordinator.RayWorkerManager(cluster, tenant="batch")

    def replicas() -> int:
        return sum(1 for r in cluster.status().instances if r.model == "warm" and r.reachable)

    async def scenario() -> int:  # 20 requests at once, one at a time from this process (capacity 1)
        batch = [asyncio.create_task(manager.generate({"model": "warm", "messages": [
            {"role": "human", "content": f"job {i}"}]})) for i in range(20)]
        most = 0
        while not all(t.done() for t in batch):
            most = max(most, (await cluster.aio.status()).waiting.get("warm@llm", 0))
            await asyncio.sleep(0.1)
        answers = [t.result() for t in batch]
        assert all(a.success for a in answers), [a.text for a in answers if not a.success]
        return most

    try:
        url = cluster.registry_url()
        for _ in range(2):
            worker_process(controller=url, heartbeat_interval=1, latency=LATENCY)
        wait_until(lambda: sum(1 for r in cluster.status().instances if r.worker_type == "service") == 2,
                   timeout=30, what="2 worker managers")
        # At its max in flight from this process, one replica carries a load of 1: not enough to
        # scale for (2 per replica wanted) — unless the requests waiting in the gate count.
        policy = Autoscale(min_replicas=1, max_replicas=2, target_in_flight=2, upscale_delay_s=0,
                           downscale_delay_s=600)
        cluster.deploy(coordinator.Deployment(model="warm", replicas=1, params=SIM, autoscale=policy))
        wait_until(lambda: replicas() == 1, timeout=30, what="one replica")

        most = asyncio.run(scenario())
        assert most >= 10, most  # the coordinator saw the gate's queue waiting for the model
        [status] = [d for d in cluster.deployments() if d.key == "warm@llm"]
        assert any(e.action == "autoscale" and "1 -> 2" in e.message for e in status.events), status.events
        wait_until(lambda: replicas() == 2, timeout=30, what="the second replica")
    finally:
        asyncio.run(manager.aclose())
        cluster.stop(forget=True)
