"""The reference worker answers as docs/protocol.md says a DB-GPT 0.8.2 worker manager
does, and registers with a controller over the controller protocol."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from reference_worker import ReferenceWorker, SimModel, WorkerSettings
from actors.registry import EmbeddedRegistry
from coordinator.core.config import EmbeddedSource

pytestmark = pytest.mark.anyio


@pytest.fixture
async def fleet():
    reg = EmbeddedRegistry(EmbeddedSource(port=0))
    url = await reg.ready()
    worker = ReferenceWorker(WorkerSettings(controller=url, heartbeat_interval=0.1,
                                            models=[SimModel(name="chatgpt-test")]))
    await worker.start()
    async with httpx.AsyncClient(base_url=f"http://{worker.address}/api/worker") as client:
        yield reg, worker, client
    await worker.stop()
    await reg.close()


async def health(reg, key):
    return {(i.port, i.healthy) for i in await reg.list_instances(key)}


async def test_registers_itself_and_its_models(fleet):
    reg, worker, _ = fleet
    assert await health(reg, "WorkerManager@service") == {(worker.port, True)}
    assert await health(reg, "chatgpt-test@llm") == {(worker.port, True)}


async def test_apply_answers_like_dbgpt(fleet):
    reg, worker, client = fleet
    body = {"model": "chatgpt-test", "apply_type": "stop", "worker_type": "llm", "params": {}, "apply_user": None}
    out = (await client.post("/apply", json=body)).json()
    assert out["success"] and out["message"] == f"model chatgpt-test@proxy/openai({worker.address}) stop successfully"
    assert await health(reg, "chatgpt-test@llm") == {(worker.port, False)}  # listed, unhealthy
    out = (await client.post("/apply", json={**body, "apply_type": "start"})).json()
    assert out["success"]
    assert await health(reg, "chatgpt-test@llm") == {(worker.port, True)}
    out = (await client.post("/apply", json={**body, "apply_type": "restart"})).json()
    assert out["message"] == f"model chatgpt-test@proxy/openai({worker.address}) start successfully"  # DB-GPT's words
    out = (await client.post("/apply", json={**body, "apply_type": "update_params", "params": {"t": 1}})).json()
    assert out["message"] == "Update worker params and restart successfully"
    # Nothing changed: DB-GPT updates without a restart.
    out = (await client.post("/apply", json={**body, "apply_type": "update_params", "params": {"t": 1}})).json()
    assert out["message"] == "Update worker params successfully"


async def test_failures_look_like_dbgpts(fleet):
    _, _, client = fleet
    r = await client.post("/apply", json={"model": "nope", "apply_type": "start", "worker_type": "llm"})
    assert (r.status_code, r.text) == (500, "Internal Server Error")
    r = await client.post("/apply", json={"model": "chatgpt-test", "apply_type": "explode"})
    assert r.status_code == 422 and "detail" in r.json()
    # DB-GPT 0.8.2 refuses a null params; so does the reference worker, so the
    # suite catches a coordinator that sends one.
    r = await client.post("/apply", json={"model": "chatgpt-test", "apply_type": "start", "params": None})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "params"]
    req = {"host": "127.0.0.1", "port": 1, "model": "chatgpt-test", "worker_type": "llm", "params": {}}
    assert (await client.post("/models/startup", json=req)).status_code == 500  # already running
    bad = {**req, "model": "x", "params": {"provider": "martian"}}
    assert (await client.post("/models/startup", json=bad)).status_code == 500


async def test_startup_and_shutdown_of_a_new_model(fleet):
    reg, worker, client = fleet
    req = {"host": "127.0.0.1", "port": worker.port, "model": "second", "worker_type": "llm",
           "params": {"provider": "proxy/openai"}}
    r = await client.post("/models/startup", json=req)
    assert (r.status_code, r.json()) == (200, None)
    assert await health(reg, "second@llm") == {(worker.port, True)}
    names = [m["model"] for m in (await client.get("/models/supports")).json()[0]["models"]]
    assert names == ["chatgpt-test", "second"]
    r = await client.post("/models/shutdown", json=req)
    assert (r.status_code, r.json()) == (200, None)
    assert await reg.list_instances("second@llm") == []


async def test_fault_knobs(fleet):
    _, worker, client = fleet
    worker.set_faults(fail_next=1)
    assert (await client.get("/models/supports")).status_code == 500
    assert (await client.get("/models/supports")).status_code == 200
    worker.set_faults(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        await client.get("/models/supports", timeout=0.3)
    worker.set_faults(hang=False, latency=0.2)
    started = time.monotonic()
    await client.get("/models/supports")
    assert time.monotonic() - started >= 0.2
    assert [e["path"] for e in worker.journal][-1] == "/api/worker/models/supports"


async def test_heartbeats_bring_a_worker_back_into_a_fresh_registry(fleet):
    reg, worker, _ = fleet
    await reg.deregister("WorkerManager@service", "127.0.0.1", worker.port, remove=True)
    deadline = time.monotonic() + 5
    while not await reg.list_instances("WorkerManager@service"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["html", "not_json", "wrong_shape", "truncated"])
async def test_garbage_knob_answers_malformed(fleet, kind):
    _, worker, client = fleet
    worker.set_faults(garbage=kind)
    try:
        r = await client.get("/models/supports")
    except httpx.RemoteProtocolError:
        assert kind == "truncated"
        return
    assert kind != "truncated"
    assert r.status_code == (500 if kind == "html" else 200)


def test_the_journal_keeps_only_the_latest_calls(monkeypatch):
    import reference_worker as rw
    import reference_worker.worker

    monkeypatch.setattr(reference_worker.worker, "JOURNAL_LIMIT", 3)
    worker = rw.ReferenceWorker(rw.WorkerSettings(models=[rw.SimModel(name="m")]))
    for i in range(5):
        worker.journal.append({"n": i})
    assert [e["n"] for e in worker.journal] == [2, 3, 4]
