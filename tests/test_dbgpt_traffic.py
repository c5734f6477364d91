"""Traffic against DB-GPT 0.8.2 itself: two DB-GPT worker managers serving a
``proxy/openai`` model (answered by tests/openai_stub.py on loopback), DB-GPT's
own OpenAI-compatible API server in front, and one worker manager SIGKILLed
while four callers chat every 50 ms.

With the project's embedded registry, DB-GPT's API server — unchanged — stops
sending chats to the dead worker within seconds: the registry lists it
unhealthy as soon as the coordinator's probes find it unreachable. With DB-GPT's
own controller it keeps choosing it (``random.choice``) until the heartbeat
timeout (60 s). The figures of both are printed (``-s``) and quoted in the
README.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest

import coordinator
from tests.conftest import ROOT, free_port, wait_until
from tests.dbgpt_env import start_apiserver, start_controller, start_worker_manager

pytestmark = [pytest.mark.ray, pytest.mark.dbgpt]

MODEL = "chatgpt-test"
EMBEDDING = "stub-embed"
KILL_AT = 5.0  # seconds into the load
AFTER = 15.0  # seconds of load after the kill
GRACE = 5.0  # from this long after the kill on, no chat may fail (embedded registry)


@pytest.fixture(scope="module")
def stub():
    proc = subprocess.Popen([sys.executable, "-m", "tests.openai_stub", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline().rsplit(":", 1)[1])
    yield port
    proc.kill()
    proc.wait()


async def _chat_load(api: str, victim, callers: int = 4, every: float = 0.05) -> list[tuple[float, bool]]:
    """Chats from ``callers`` callers, one every ``every`` s each; the victim
    SIGKILLed at KILL_AT. Each result: (seconds since the kill, succeeded)."""
    results: list[tuple[float, bool]] = []
    start = time.monotonic()
    killed_at: list[float] = []
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    async with httpx.AsyncClient(timeout=20) as client:
        async def caller() -> None:
            while time.monotonic() - start < KILL_AT + AFTER:
                sent = time.monotonic()
                try:
                    r = await client.post(f"{api}/api/v1/chat/completions", json=body)
                    ok = r.status_code == 200 and "stub reply" in r.text
                except httpx.HTTPError:
                    ok = False
                results.append((sent, ok))
                await asyncio.sleep(every)

        async def killer() -> None:
            await asyncio.sleep(KILL_AT)
            victim.kill()
            killed_at.append(time.monotonic())

        await asyncio.gather(killer(), *(caller() for _ in range(callers)))
    return [(sent - killed_at[0], ok) for sent, ok in results]


def _figures(results: list[tuple[float, bool]]) -> dict[str, int]:
    after = [ok for t, ok in results if t >= 0]
    late = [ok for t, ok in results if t >= GRACE]
    # A chat sent just before the kill may be in flight on the victim when it dies.
    return {"before_kill": sum(1 for t, _ in results if t < 0),
            "failed_before_kill": sum(1 for t, ok in results if t < -1.0 and not ok),
            "after_kill": len(after), "failed_after_kill": after.count(False),
            "from_5s": len(late), "failed_from_5s": late.count(False),
            "last_failure_s": round(max((t for t, ok in results if not ok), default=-1.0), 2)}


def test_dbgpts_api_server_on_the_embedded_registry_stops_failing_within_seconds(ray_session, dbgpt_bin, stub,
                                                                                 tmp_path):
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "name": "reg", "port": 0, "heartbeat_interval": 1,
                         "heartbeat_timeout": 60}],
         "timeouts": {"connect": 2}},
        name="dbgpt-traffic", namespace="tests",
    )
    started = []
    try:
        url = cluster.registry_url()
        workers, embedders = [], []
        for _ in range(2):
            w = start_worker_manager(dbgpt_bin, free_port(), url, tmp_path, closed_port=stub)
            started.append(w)
            workers.append(w)
            e = start_worker_manager(dbgpt_bin, free_port(), url, tmp_path, model=None, closed_port=stub,
                                     embedding=EMBEDDING)
            started.append(e)
            embedders.append(e)
        cluster.wait_for(MODEL, count=2, timeout=60)
        cluster.wait_for(EMBEDDING, count=2, worker_type="text2vec", timeout=60)
        wait_until(lambda: sum(1 for r in cluster.status().instances if r.model == MODEL and r.reachable) == 2,
                   timeout=30, what="both workers probed")
        api = start_apiserver(dbgpt_bin, free_port(), url, tmp_path)
        started.append(api)

        results = asyncio.run(_chat_load(api.url, workers[1]))
        figures = _figures(results)
        print(f"\nDB-GPT API server on the embedded registry: {figures}")
        assert figures["failed_before_kill"] == 0
        assert figures["from_5s"] > 20
        assert figures["failed_from_5s"] == 0, figures

        # RayWorkerManager through the surviving DB-GPT workers (one chat and
        # one embedding worker dead; the embedding one just now, before the
        # probes can have noticed).
        embedders[0].kill()
        manager = coordinator.RayWorkerManager(cluster)

        async def through_the_manager():
            chat = {"model": MODEL, "messages": [{"role": "human", "content": "hi there"}]}
            answers = await asyncio.gather(*(manager.generate(chat) for _ in range(8)))
            assert all(a.success and "stub reply to: hi there" in a.text for a in answers), answers
            chunks = [c async for c in manager.generate_stream(chat)]
            assert chunks and all(c.success for c in chunks) and "stub reply" in chunks[-1].text
            for _ in range(6):
                vectors = await manager.embeddings({"model": EMBEDDING, "input": ["a", "b"],
                                                    "worker_type": "text2vec"})
                assert len(vectors) == 2 and len(vectors[0]) == 8
            await manager.aclose()

        asyncio.run(through_the_manager())
    finally:
        for proc in started:
            proc.kill()
        cluster.stop()


def test_dbgpts_api_server_on_dbgpts_own_controller_keeps_failing(dbgpt_bin, stub, tmp_path):
    started = []
    try:
        controller = start_controller(dbgpt_bin, free_port(), tmp_path)
        started.append(controller)
        workers = []
        for _ in range(2):
            w = start_worker_manager(dbgpt_bin, free_port(), controller.url, tmp_path, closed_port=stub)
            started.append(w)
            workers.append(w)
        wait_until(lambda: len([r for r in httpx.get(f"{controller.url}/api/controller/models",
                                                     params={"model_name": f"{MODEL}@llm", "healthy_only": True},
                                                     timeout=5).json()]) == 2, timeout=60)
        api = start_apiserver(dbgpt_bin, free_port(), controller.url, tmp_path)
        started.append(api)
        figures = _figures(asyncio.run(_chat_load(api.url, workers[1])))
        print(f"\nDB-GPT API server on DB-GPT's controller: {figures}")
        # What the embedded registry fixes: the dead worker keeps being chosen.
        assert figures["failed_from_5s"] > 0, figures
    finally:
        for proc in started:
            proc.kill()
