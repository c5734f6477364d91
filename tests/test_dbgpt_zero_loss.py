"""Zero-loss changes seen by DB-GPT 0.8.2's own API server, which reports
nothing to the coordinator and picks an instance from the embedded registry
on every request: a rolling restart of four reference workers (whose models
abort what is in flight when they stop, and take ``load_s`` to load) under
streamed chats through it. The drain lists each instance unhealthy in the
registry, then lasts ``drain.grace`` after the registry last showed it to a
reader — longer than a stream — so nothing the API server sent is cut."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

import coordinator
from tests.conftest import free_port, wait_until
from tests.dbgpt_env import start_apiserver
from tests.test_traffic import FAST, SLOW_HEARTBEATS, probed
from tests.streamed_load import PROMPT, aborted
from tests.test_zero_loss import LOAD_S, MODEL

pytestmark = [pytest.mark.ray, pytest.mark.dbgpt]

#: Longer than a stream (~2.5 s): what the API server sent before the registry
#: stopped listing an instance has ended when the drain does.
GRACE = 4.0


def test_a_rolling_restart_under_dbgpts_api_server_loses_nothing(ray_session, dbgpt_bin, worker_process, tmp_path):
    cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST, "drain": {"timeout": 30, "grace": GRACE}},
                                name="dbgpt-zero-loss", namespace="tests")
    api = None
    try:
        url = cluster.registry_url()
        ports = [worker_process(f"{MODEL}@llm", controller=url, heartbeat_interval=1, load_s=LOAD_S, chunks=30,
                                chunk_delay=0.08).port for _ in range(4)]
        probed(cluster, MODEL, 4)
        api = start_apiserver(dbgpt_bin, free_port(), url, tmp_path)
        outcomes: list[str] = []
        stop = threading.Event()

        async def load() -> None:
            async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
                async def caller(i: int) -> None:
                    body = {"model": MODEL, "stream": True,
                            "messages": [{"role": "user", "content": f"{i} {PROMPT}"}]}
                    while not stop.is_set():
                        try:
                            async with client.stream("POST", "/api/v1/chat/completions", json=body) as r:
                                text = (await r.aread()).decode()
                            ok = r.status_code == 200 and "[DONE]" in text and '"finish_reason":"stop"' in text.replace(" ", "")
                            outcomes.append("ok" if ok else f"HTTP {r.status_code}: {text[-300:]!r}")
                        except httpx.HTTPError as exc:
                            outcomes.append(f"{type(exc).__name__}: {exc}")

                await asyncio.gather(*(caller(i) for i in range(4)))

        runner = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
        runner.start()
        try:
            wait_until(lambda: len(outcomes) >= 4, timeout=60, what="chats through DB-GPT's API server")
            assert outcomes[:4] == ["ok"] * 4, outcomes[:4]
            result = cluster.apply(MODEL, "restart", max_unavailable=1)
            assert result.output.success, result.output.message
            # The API server read the registry all along: each drain waited for its grace.
            assert all("drained in" in o.message for o in result.outputs), [o.message for o in result.outputs]
            during = len(outcomes)
        finally:
            stop.set()
            runner.join(timeout=60)
        lost = [o for o in outcomes if o != "ok"]
        assert lost == [], lost[:3]
        assert aborted(ports) == 0
        assert during > 12
    finally:
        if api is not None:
            api.kill()
        cluster.stop(forget=True)
