"""The reference worker answers as docs/protocol.md says a DB-GPT 0.8.2 worker manager
does, and registers with a controller over the controller protocol."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack

import httpx
import pytest

from reference_worker import ReferenceWorker, SimModel, WorkerSettings
from actors.registry import EmbeddedRegistry
from coordinator.core.config import EmbeddedSource
from coordinator.core.inference import ModelOutput
from tests.conftest import poll

pytestmark = pytest.mark.anyio


@pytest.fixture
async def start_worker():
    """``start(**settings)``: a reference worker registered with an embedded
    registry, as (registry, worker, client of its /api/worker); all stopped after."""
    reg = EmbeddedRegistry(EmbeddedSource(port=0))
    url = await reg.ready()
    async with AsyncExitStack() as stack:

        async def start(**settings):
            worker = ReferenceWorker(WorkerSettings(controller=url, heartbeat_interval=0.1, **settings))
            await worker.start()
            stack.push_async_callback(worker.stop)
            client = httpx.AsyncClient(base_url=f"http://{worker.address}/api/worker", timeout=10)
            return reg, worker, await stack.enter_async_context(client)

        yield start
    await reg.close()


@pytest.fixture
async def fleet(start_worker):
    return await start_worker(models=[SimModel(name="chatgpt-test")])


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


async def test_the_journal_says_when_a_client_gave_up_on_a_control_call_still_running(fleet):
    _, worker, client = fleet
    body = {"model": "chatgpt-test", "apply_type": "restart", "worker_type": "llm", "params": {}}
    assert (await client.post("/apply", json=body)).status_code == 200  # answered: the client was there
    worker.set_faults(latency=1.0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up; the apply runs on here
        await client.post("/apply", json=body, timeout=0.3)
    answered, given_up = [e for e in worker.journal if e["path"] == "/api/worker/apply"]
    await poll(lambda: "t_end" in given_up, timeout=5, what="the given-up apply ended")
    assert "t_client_gone" not in answered
    assert given_up["t"] < given_up["t_client_gone"] < given_up["t_end"]


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


# ---- a model that stops aborts its requests in flight, as a real engine does ----


@pytest.fixture
async def two_models(start_worker):
    """Models a and b on one worker, a streamed answer taking 5 chunks 0.3 s apart."""
    return await start_worker(models=[SimModel(name="a"), SimModel(name="b")], chunks=5, chunk_delay=0.3)


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "human", "content": "tell me a long story"}]}


def apply(model: str, apply_type: str, params: dict | None = None) -> dict:
    return {"model": model, "apply_type": apply_type, "worker_type": "llm", "params": params or {}}


class Stream:
    """A generate_stream read in the background: the chunks so far, and
    ``ended``, "complete" or "cut" (the connection dropped mid-body)."""

    def __init__(self, client: httpx.AsyncClient, model: str) -> None:
        self.chunks: list[dict] = []
        self.ended = asyncio.get_running_loop().create_task(self._read(client, model))

    async def _read(self, client: httpx.AsyncClient, model: str) -> str:
        try:
            async with client.stream("POST", "/generate_stream", json=chat(model)) as r:
                assert r.status_code == 200
                buffer = b""
                async for data in r.aiter_bytes():
                    *done, buffer = (buffer + data).split(b"\0")  # DB-GPT ends each chunk with a NUL
                    self.chunks += [json.loads(c) for c in done if c.strip()]
        except httpx.RemoteProtocolError:
            return "cut"
        return "complete"


def aborted(worker: ReferenceWorker) -> list[tuple[str, str]]:
    """(path, model) of each journalled call marked aborted."""
    return [(e["path"].rsplit("/", 1)[1], json.loads(e["body"])["model"]) for e in worker.journal if e.get("aborted")]


async def stop_model(client: httpx.AsyncClient, worker: ReferenceWorker, model: str, how: str) -> None:
    match how:
        case "shutdown":
            req = {"host": "127.0.0.1", "port": worker.port, "model": model, "worker_type": "llm", "params": {}}
            r = await client.post("/models/shutdown", json=req)
        case "update_params":  # a changed parameter: DB-GPT reloads the model
            r = await client.post("/apply", json=apply(model, how, {"temperature": 0.1}))
            assert r.json()["message"] == "Update worker params and restart successfully"
        case _:
            r = await client.post("/apply", json=apply(model, how))
    assert r.status_code == 200


@pytest.mark.parametrize("how", ["shutdown", "restart", "update_params", "stop"])
async def test_a_model_that_stops_cuts_its_streams_and_no_other_models(two_models, how):
    _, worker, client = two_models
    a, b = Stream(client, "a"), Stream(client, "b")
    await poll(lambda: a.chunks and b.chunks, what="both streams under way")
    await stop_model(client, worker, "a", how)
    assert await a.ended == "cut"
    assert a.chunks[-1]["finish_reason"] is None  # dropped mid-body, no last chunk
    assert await b.ended == "complete"
    assert len(b.chunks) == 5 and b.chunks[-1]["finish_reason"] == "stop"
    assert aborted(worker) == [("generate_stream", "a")]
    assert worker.requests_in_flight.count("a@llm") == worker.requests_in_flight.count("b@llm") == 0


async def test_a_model_that_stops_answers_its_generate_in_flight_with_a_bare_500(two_models):
    _, worker, client = two_models
    answer = asyncio.get_running_loop().create_task(client.post("/generate", json=chat("a")))
    await poll(lambda: worker.requests_in_flight.count("a@llm") == 1, what="the generate in flight")
    await stop_model(client, worker, "a", "stop")
    r = await answer
    assert (r.status_code, r.text) == (500, "Internal Server Error")
    assert aborted(worker) == [("generate", "a")]


async def test_a_model_stopped_and_started_again_serves_new_requests(two_models):
    _, worker, client = two_models
    await stop_model(client, worker, "a", "restart")
    a = Stream(client, "a")
    assert await a.ended == "complete" and aborted(worker) == []


@pytest.mark.parametrize("how", ["restart", "update_params"])
async def test_a_reloaded_model_is_registered_and_served_only_after_load_s(start_worker, how):
    reg, worker, client = await start_worker(models=[SimModel(name="a")], load_s=0.5)
    started = time.monotonic()
    reload = asyncio.get_running_loop().create_task(stop_model(client, worker, "a", how))

    async def loading() -> bool:  # stopped, listed unhealthy, not started yet
        return await health(reg, "a@llm") == {(worker.port, False)}

    await poll(loading, what="a loading")
    loading = ModelOutput.model_validate((await client.post("/generate", json=chat("a"))).json())
    assert loading.error_code != 0 and "Cound not found worker instances for model name a" in loading.text
    await reload
    assert time.monotonic() - started >= 0.5
    assert await health(reg, "a@llm") == {(worker.port, True)}  # registered before the apply answers
    served = ModelOutput.model_validate((await client.post("/generate", json=chat("a"))).json())
    assert served.error_code == 0
    # The journal tells the refused call from the served one.
    first, second = (e.get("refused") for e in worker.journal if e["path"] == "/api/worker/generate")
    assert first and loading.text.endswith(first) and second is None, (first, second)


def test_start_delay_is_the_older_name_of_load_s():
    assert WorkerSettings(start_delay=1.5).load_s == WorkerSettings(load_s=1.5).load_s == 1.5
