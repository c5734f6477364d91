"""Traffic: what the coordinator knows about liveness reaches requests — the
embedded registry's health, and RayWorkerManager's inference calls. Real
reference worker processes, real kills."""

from __future__ import annotations

import asyncio
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


def journal(port: int, path: str) -> list[dict]:
    return [e for e in httpx.get(f"http://127.0.0.1:{port}/api/_reference/journal", timeout=5).json()
            if e["path"] == f"/api/worker/{path}"]


def who(output: coordinator.ModelOutput) -> int:
    """The port of the reference worker that wrote the answer."""
    return int(output.text.split("[127.0.0.1:", 1)[1].split("]", 1)[0])


async def collect(stream) -> list[coordinator.ModelOutput]:
    return [o async for o in stream]


def test_inference_goes_to_live_workers_and_fails_over_only_what_was_never_sent(clusters, worker_process):
    cluster = clusters("traffic-infer")
    url = cluster.registry_url()
    workers = [worker_process("chat@llm", "vec@text2vec", controller=url, heartbeat_interval=1) for _ in range(2)]
    probed(cluster, "chat", 2)
    manager = coordinator.RayWorkerManager(cluster)

    async def scenario():
        chat = {"model": "chat", "messages": [{"role": "human", "content": "hello"}], "temperature": 0.1}
        answers = await asyncio.gather(*(manager.generate(chat) for _ in range(20)))
        assert all(a.success for a in answers), [a.text for a in answers if not a.success]
        assert {who(a) for a in answers} == {w.port for w in workers}  # both serve
        chunks = await collect(manager.generate_stream(chat))
        assert chunks[-1].finish_reason == "stop" and chunks[-1].text.endswith("answers: hello")
        assert len(await manager.embeddings({"model": "vec", "input": ["a", "b"]})) == 2
        assert await manager.count_token({"model": "chat", "prompt": "one two three"}) == 3
        assert (await manager.get_model_metadata({"model": "chat"})).context_length == 4096
        picked = await manager.select_one_instance("llm", "chat")
        assert picked.port in {w.port for w in workers} and picked.healthy
        assert await manager.parameter_descriptions("llm", "chat") == []  # started with no params
        with pytest.raises(coordinator.NoInstancesError):
            await manager.select_one_instance("llm", "nope")

        # One worker dies. Before the probes notice, its connections are refused:
        # those requests never reached it, so they go to the other one.
        workers[1].kill()
        answers = await asyncio.gather(*(manager.generate(chat) for _ in range(20)))
        assert all(a.success for a in answers), [a.text for a in answers if not a.success]
        assert {who(a) for a in answers} == {workers[0].port}
        streamed = await asyncio.gather(*(collect(manager.generate_stream(chat)) for _ in range(10)))
        assert all(s[-1].success and who(s[-1]) == workers[0].port for s in streamed)
        assert len(await manager.embeddings({"model": "vec", "input": ["x"]})) == 1

        # No instance at all: DB-GPT's answer, an error output naming the model.
        nothing = await manager.generate({"model": "nope", "messages": []})
        assert nothing.error_code == 1 and "nope@llm" in nothing.text
        with pytest.raises(coordinator.InferenceError, match="nope@text2vec"):
            await manager.embeddings({"model": "nope", "input": ["x"]})
        assert manager.in_flight() == {}  # every send counted out, failed or not
        await manager.aclose()

    asyncio.run(scenario())
    assert manager.sync_embeddings({"model": "vec", "input": ["s"]})[0]
    # Once the probes have found the dead one out (a suspect is skipped only
    # until the route table next lists it, which a loaded machine may do first).
    wait_until(lambda: manager.sync_select_one_instance("llm", "chat").port == workers[0].port, timeout=10,
               what="the live worker selected")


def test_a_stream_that_breaks_midway_ends_with_an_error_and_is_not_resent(clusters, worker_process):
    cluster = clusters("traffic-break")
    url = cluster.registry_url()
    victim = worker_process("chat@llm", controller=url, heartbeat_interval=1, chunk_delay=0.5, chunks=8)
    manager = coordinator.RayWorkerManager(cluster)
    probed(cluster, "chat", 1)
    other = worker_process("chat@llm", controller=url, heartbeat_interval=1)
    probed(cluster, "chat", 2)

    async def scenario():
        # Until one goes to the slow worker, then kill it after its first chunk.
        for _ in range(50):
            stream = manager.generate_stream({"model": "chat", "messages": [{"role": "human", "content": "hi"}]})
            first = await anext(stream)
            if who(first) == victim.port:
                break
            await collect(stream)
        else:
            raise AssertionError("never routed to the slow worker")
        before = len(journal(other.port, "generate_stream"))
        victim.kill()
        rest = await asyncio.wait_for(collect(stream), timeout=30)  # never a hang
        return before, rest

    before, rest = asyncio.run(scenario())
    assert rest[-1].error_code == 1, rest
    assert f"127.0.0.1:{victim.port}" in rest[-1].text and "stream broken" in rest[-1].text
    # ...and it was not sent again to the other worker.
    assert len(journal(other.port, "generate_stream")) == before


def test_load_follows_speed(clusters, worker_process):
    cluster = clusters("traffic-spread")
    url = cluster.registry_url()
    fast = worker_process("chat@llm", controller=url, heartbeat_interval=1)
    slow = worker_process("chat@llm", controller=url, heartbeat_interval=1, latency=0.2)
    probed(cluster, "chat", 2)
    manager = coordinator.RayWorkerManager(cluster)

    async def load():
        async def caller():
            ports = []
            for _ in range(15):
                ports.append(who(await manager.generate({"model": "chat", "messages": []})))
            return ports
        return [p for ports in await asyncio.gather(*(caller() for _ in range(8))) for p in ports]

    served = asyncio.run(load())
    print(f"fast served {served.count(fast.port)}, slow {served.count(slow.port)}")
    assert served.count(fast.port) > 2 * served.count(slow.port)
