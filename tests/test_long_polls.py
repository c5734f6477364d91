"""Long polls sized for fleets: the coordinator keeps answering while thousands
of callers park their route-table polls on it, and one process follows the
route table once, however many RayWorkerManagers it holds."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import ray

import coordinator
from coordinator.driver.router import FOLLOWER_THREAD
from tests.conftest import wait_until
from tests.test_traffic import FAST, SLOW_HEARTBEATS, clusters, probed  # noqa: F401 - the fixture

pytestmark = pytest.mark.ray


def test_a_thousand_parked_route_table_polls_leave_the_coordinator_answering(clusters):
    cluster = clusters("polls-parked")
    handle = ray.get_actor("polls-parked", namespace="tests")
    first = ray.get(handle.routes_since.remote(None, 1.0), timeout=30)  # a snapshot: where the table is now
    now = (first.epoch, first.version)
    parked = [handle.routes_since.remote(now, 300.0) for _ in range(1000)]  # as 1,000 caller processes would
    # One caller's calls start in the order they were sent: the status call
    # below starts after every poll has (with Ray's default max_concurrency of
    # 1,000 it would wait behind them until they time out).
    asked = time.monotonic()
    status = ray.get(handle.status.remote(), timeout=30.0)
    took = time.monotonic() - asked
    print(f"status answered in {took:.3f} s with 1,000 polls parked")
    ready, _ = ray.wait(parked, num_returns=len(parked), timeout=0)
    assert not ready  # nothing changed: every poll was, and is, parked
    assert took < 1.0  # the bound: a liveness check (it takes ~0.01 s here)
    assert status.instances == []
    for ref in parked:
        ray.cancel(ref)


def followers(cluster: coordinator.Cluster) -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith(FOLLOWER_THREAD) and t.name.endswith(f"/{cluster.name}") and t.is_alive()]


def test_the_managers_of_one_process_share_one_route_table_follower(clusters, worker_process):
    cluster = clusters("polls-shared")
    worker = worker_process("chat@llm", controller=cluster.registry_url(), heartbeat_interval=1)
    probed(cluster, "chat", 1)
    first = coordinator.RayWorkerManager(coordinator.attach("polls-shared", namespace="tests"))
    second = coordinator.RayWorkerManager(coordinator.attach("polls-shared", namespace="tests"))

    async def scenario():
        chat = {"model": "chat", "messages": [{"role": "human", "content": "hi"}]}
        stream = first.generate_stream(chat)
        await anext(stream)  # one request in flight through the first manager...
        assert (await second.select_one_instance("llm", "chat")).port == worker.port
        assert len(followers(cluster)) == 1
        # ...which the second counts too: in-flight counts are the process's, as the follower is.
        assert second.in_flight() == first.in_flight() == {("127.0.0.1", worker.port): 1}
        await stream.aclose()

        await first.aclose()  # one gives the table back: the other still follows it
        assert len(followers(cluster)) == 1
        assert (await second.generate(chat)).success
        await second.aclose()  # the last one: the follower stops (its parked poll is cancelled)

    asyncio.run(scenario())
    wait_until(lambda: not followers(cluster), timeout=10, what="the follower thread ended after the last aclose")
