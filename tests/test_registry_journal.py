"""The embedded registry's journal: what a restart keeps, and what saving costs.
The registry runs as a plain object on the test's loop, over real HTTP; the
key-value store is a dict that counts writes."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import httpx
import pytest

import actors.registry
from actors.registry import EmbeddedRegistry
from actors.registry_state import Journal, MemoryStateStore
from coordinator.core.config import EmbeddedSource

pytestmark = pytest.mark.anyio

KEY = "c/registry/fleet"


def instance(key: str, port: int = 18001, **kw) -> dict:
    return {"model_name": key, "host": "127.0.0.1", "port": port, **kw}


@asynccontextmanager
async def serving(store: MemoryStateStore):
    """A registry on ``store``, and a client for it; both closed on the way out
    (as a killed actor would be: nothing more is written after)."""
    reg, client = await started(store)
    try:
        yield reg, client
    finally:
        await client.aclose()
        await reg.close()


async def started(store: MemoryStateStore, **settings) -> tuple[EmbeddedRegistry, httpx.AsyncClient]:
    reg = EmbeddedRegistry(EmbeddedSource(port=0, **settings), state=Journal(store, KEY))
    url = await reg.ready()
    return reg, httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=200))


def segments(store: MemoryStateStore) -> list[dict]:
    return [json.loads(v) for k, v in sorted(store.data.items()) if k.startswith(f"{KEY}/log/")]


async def test_every_answered_registration_survives_a_restart_after_a_burst():
    store = MemoryStateStore()
    async with serving(store) as (reg, client):  # closed after, as a killed actor would be
        port = reg._http.port
        answers = await asyncio.gather(*(
            client.post("/api/controller/models", json=instance(f"m{i}@llm", 18000 + i % 7)) for i in range(300)
        ))
        assert all(r.json() is True for r in answers)
        await client.delete("/api/controller/models", params={
            "model_name": "m3@llm", "host": "127.0.0.1", "port": 18003, "remove_from_registry": "true"})
        await client.delete("/api/controller/models", params={
            "model_name": "m4@llm", "host": "127.0.0.1", "port": 18004, "remove_from_registry": "false"})
        before = {(i.model_name, i.port, i.healthy) for i in await reg.list_instances()}

    async with serving(store) as (again, client):
        assert again._http.port == port  # the same address
        assert {(i.model_name, i.port, i.healthy) for i in await again.list_instances()} == before
        assert len(before) == 299 and ("m4@llm", 18004, False) in before


async def test_a_burst_of_registrations_shares_journal_writes():
    store = MemoryStateStore()
    async with serving(store) as (reg, client):
        puts = store.puts
        await asyncio.gather(*(
            client.post("/api/controller/models", json=instance(f"m{i}@llm")) for i in range(200)
        ))
        assert store.puts - puts < 100  # group commit: far fewer writes than registrations


async def test_a_change_writes_what_changed_not_the_whole_registry():
    store = MemoryStateStore()
    async with serving(store) as (reg, client):
        for i in range(50):
            await client.post("/api/controller/models", json=instance(f"m{i}@llm"))
        await client.post("/api/controller/models", json=instance("last@llm"))
        last = segments(store)[-1]
        assert [e["model_name"] for e in last["put"]] == ["last@llm"] and last["removed"] == []
        written = store.puts
        for _ in range(20):  # heartbeats of healthy entries change nothing: nothing is written
            await client.post("/api/controller/heartbeat", json=instance("m7@llm"))
        assert store.puts == written


async def test_compaction_folds_the_journal_into_a_base_and_restore_agrees(monkeypatch):
    import actors.registry_state

    monkeypatch.setattr(actors.registry_state, "COMPACT_AT_LEAST", 10)
    store = MemoryStateStore()
    async with serving(store) as (reg, client):  # closed after, as a killed actor would be
        for round_ in range(3):  # 3 x 60 changes to 60 entries: more records than entries, so a new base
            for i in range(60):
                await client.post("/api/controller/models", json=instance(f"m{i}@llm", weight=float(round_)))
        before = {(i.model_name, i.weight) for i in await reg.list_instances()}
        base = json.loads(store.data[f"{KEY}/base"])
        assert base["seq"] > 1 and len(segments(store)) < 180
    async with serving(store) as (again, client):
        assert {(i.model_name, i.weight) for i in await again.list_instances()} == before


async def test_the_single_blob_state_of_an_older_version_is_restored():
    store = MemoryStateStore()
    store.data[KEY] = json.dumps({"port": 0, "store": {"version": 3, "entries": [
        instance("old@llm", healthy=True, check_healthy=False)]}}).encode()
    async with serving(store) as (reg, client):
        assert [i.model_name for i in await reg.list_instances()] == ["old@llm"]
        await client.post("/api/controller/models", json=instance("new@llm"))
        assert KEY not in store.data  # replaced by the journal's own layout


async def test_a_write_that_cannot_be_saved_is_refused_not_acknowledged(monkeypatch):
    monkeypatch.setattr(actors.registry, "SAVE_TIMEOUT", 0.5)
    monkeypatch.setattr(actors.registry, "SAVE_RETRY", 0.05)
    store = MemoryStateStore()
    async with serving(store) as (reg, client):
        store.fail = True
        r = await client.post("/api/controller/models", json=instance("unsaved@llm"))
        assert r.status_code == 503 and "could not save" in r.json()["detail"]
        store.fail = False  # the store is back: the journal catches up by itself
        r = await client.post("/api/controller/models", json=instance("saved@llm"))
        assert r.json() is True
        names = {e["model_name"] for s in segments(store) for e in s["put"]}
        assert {"unsaved@llm", "saved@llm"} <= names


async def test_a_write_that_arrives_before_the_first_save_waits_for_it_then_is_answered():
    """The registry serves before its journal has written its first base; a
    write in that gap is not answered until it is saved, and then it is."""
    from tests.conftest import free_port

    class Gated(MemoryStateStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()

        async def put(self, key: str, value: bytes) -> None:
            await self.gate.wait()
            await super().put(key, value)

    store, port = Gated(), free_port()
    reg = EmbeddedRegistry(EmbeddedSource(port=port), state=Journal(store, KEY))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(200):  # serving, with the base still unwritten
            try:
                await client.get("/api/health")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.02)
        answer = asyncio.ensure_future(client.post("/api/controller/models", json=instance("early@llm")))
        await asyncio.sleep(0.2)
        assert not answer.done()  # not answered before it is saved
        store.gate.set()
        r = await asyncio.wait_for(answer, 5)
        assert r.json() is True
    await reg.close()
