"""The caller's pool: at most ``caller.max_connections_per_worker`` requests in
flight from a process to each worker. A worker at the limit is passed over; a
request that finds no connection free within ``caller.pool_timeout`` was never
sent and goes elsewhere; with every worker at the limit a request fails at
once, naming it — never minutes in a queue."""

from __future__ import annotations

import asyncio
import time

import pytest

import coordinator
from coordinator.core.config import CallerSettings, CoordinatorConfig
from coordinator.core.inference import Route
from coordinator.driver.caller import NeverSent, WorkerCaller
from tests.test_traffic import FAST, SLOW_HEARTBEATS, clusters, probed, who  # noqa: F401 - the fixture

LIMIT = {"max_connections_per_worker": 2, "pool_timeout": 0.5}
CHAT = {"model": "chat", "messages": [{"role": "human", "content": "hi"}]}


def test_caller_settings_have_sensible_defaults_and_refuse_nonsense():
    config = CoordinatorConfig.model_validate({"registries": [SLOW_HEARTBEATS]})
    assert config.caller == CallerSettings(max_connections_per_worker=100, pool_timeout=1.0)
    with pytest.raises(ValueError, match="max_connections_per_worker"):
        CallerSettings(max_connections_per_worker=0)
    with pytest.raises(ValueError, match="pool_timeout"):
        CoordinatorConfig.model_validate({"registries": [SLOW_HEARTBEATS], "caller": {"pool_timeout": 0}})


def test_a_request_that_finds_every_connection_to_its_worker_busy_is_never_sent(worker_process):
    """The pool's own wait, below the router's choice: short, and counted as never sent."""
    worker = worker_process("chat@llm", chunk_delay=1, chunks=30)
    config = CoordinatorConfig.model_validate({"registries": [SLOW_HEARTBEATS], "caller": LIMIT})
    route = Route("chat@llm", "127.0.0.1", worker.port, 1.0, ("reg",))
    caller = WorkerCaller(config, read_timeout=600)

    async def scenario():
        streams = [caller.stream(route, "/generate_stream", CHAT) for _ in range(2)]
        for stream in streams:
            await anext(stream)  # both connections held, mid-answer
        asked = time.monotonic()
        with pytest.raises(NeverSent, match=r"all 2 connections to the worker busy for 0\.5 s \(never sent\)"):
            await caller.call(route, "POST", "/count_token", json={"model": "chat", "prompt": "a b"})
        waited = time.monotonic() - asked
        for stream in streams:
            await stream.aclose()
        assert await caller.call(route, "POST", "/count_token", json={"model": "chat", "prompt": "a b"}) == 2
        await caller.aclose()
        return waited

    waited = asyncio.run(scenario())
    assert waited < 30  # generous: the point is seconds, not the read timeout's ten minutes


@pytest.mark.ray
def test_a_worker_at_its_limit_is_passed_over_and_a_fleet_at_it_fails_at_once(clusters, worker_process):
    cluster = clusters("caller-limits", caller=LIMIT)
    url = cluster.registry_url()
    workers = {w.port: w for w in (worker_process("chat@llm", controller=url, heartbeat_interval=1,
                                                  chunk_delay=1, chunks=30) for _ in range(2))}
    probed(cluster, "chat", 2)
    manager = coordinator.RayWorkerManager(cluster)

    async def scenario():
        streams, held = [], []
        for _ in range(3):  # slow streams, held open mid-answer: one worker at the limit of 2, the other at 1
            stream = manager.generate_stream(CHAT)
            held.append(who(await anext(stream)))
            streams.append(stream)
        [busy] = [p for p in workers if held.count(p) == 2]
        [other] = set(workers) - {busy}
        assert manager.in_flight() == {("127.0.0.1", busy): 2, ("127.0.0.1", other): 1}

        # A third request for the busy worker's model goes to the other one, at once.
        picked = await asyncio.wait_for(manager.select_one_instance("llm", "chat"), 10)
        assert picked.port == other
        assert await asyncio.wait_for(manager.count_token({"model": "chat", "prompt": "a b c"}), 10) == 3

        # Every worker at the limit: nothing is sent, and the error names the limit.
        stream = manager.generate_stream(CHAT)
        await anext(stream)
        streams.append(stream)
        asked = time.monotonic()
        answer = await asyncio.wait_for(manager.generate(CHAT), 10)
        with pytest.raises(coordinator.InferenceError, match="caller.max_connections_per_worker"):
            await asyncio.wait_for(manager.count_token({"model": "chat", "prompt": "x"}), 10)
        failed_in = time.monotonic() - asked
        for s in streams:
            await s.aclose()
        # Once the streams end, the workers take requests again.
        assert await manager.count_token({"model": "chat", "prompt": "a b"}) == 2
        await manager.aclose()
        return answer, failed_in

    answer, failed_in = asyncio.run(scenario())
    print(f"failed in {failed_in:.3f} s with every worker at its limit")
    assert answer.error_code == 1
    assert "limit of 2 requests in flight" in answer.text and "caller.max_connections_per_worker" in answer.text
    for port in workers:
        assert f"127.0.0.1:{port}" in answer.text
