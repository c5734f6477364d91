"""The embedded registry over real HTTP on loopback, and watchers following it.
No Ray: the registry and watchers run as plain objects on the test's loop."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import yaml

from actors.controller_api import RegistryUnavailable
from actors.registry import EmbeddedRegistry
from actors.registry_state import Journal, MemoryStateStore
from actors.sources import DbgptControllerSource, SourceError, StaticFileSource
from actors.watcher import RegistryWatcher
from coordinator.core.changes import Snapshot
from coordinator.core.config import BackoffSettings, DbgptSource, EmbeddedSource, StaticSource
from coordinator.core.liveset import Screened
from coordinator.core.models import ModelInstance
from tests.conftest import free_port

pytestmark = pytest.mark.anyio

FAST_BACKOFF = BackoffSettings(initial=0.05, maximum=0.2)


@pytest.fixture
async def registry():
    reg = EmbeddedRegistry(EmbeddedSource(port=0, heartbeat_interval=0.1, heartbeat_timeout=0.3))
    url = await reg.ready()
    async with httpx.AsyncClient(base_url=url) as client:
        yield reg, url, client
    await reg.close()


def instance(key="chatgpt-test@llm", port=18001, **kw):
    return {"model_name": key, "host": "127.0.0.1", "port": port, "weight": 1.0, "check_healthy": True,
            "healthy": False, "enabled": True, "prompt_template": None, "last_heartbeat": None,
            "remove_from_registry": False, **kw}


async def test_serves_dbgpts_controller_api(registry):
    _, _, client = registry
    assert (await client.get("/api/health")).json() == {"status": "ok"}
    assert (await client.post("/api/controller/models", json=instance())).json() is True
    [got] = (await client.get("/api/controller/models")).json()
    assert set(got) == set(instance())  # the same fields DB-GPT's controller returns
    assert got["healthy"] is True and got["last_heartbeat"]
    r = await client.get("/api/controller/models", params={"model_name": "other@llm"})
    assert r.json() == []
    r = await client.delete("/api/controller/models", params={
        "model_name": "chatgpt-test@llm", "host": "127.0.0.1", "port": 18001, "remove_from_registry": "false"})
    assert r.json() is True
    assert (await client.get("/api/controller/models", params={"healthy_only": "true"})).json() == []
    assert len((await client.get("/api/controller/models")).json()) == 1
    assert (await client.post("/api/controller/heartbeat", json=instance(port=18002))).json() is True
    assert len((await client.get("/api/controller/models", params={"healthy_only": True})).json()) == 1


async def test_bad_bodies_get_422_and_change_nothing(registry):
    _, _, client = registry
    for body in ({"host": "h"}, {**instance(), "port": "x"}, {**instance(), "port": 70000}):
        assert (await client.post("/api/controller/models", json=body)).status_code == 422
    assert (await client.post("/api/controller/models", content=b"{not json")).status_code == 422
    assert (await client.get("/api/controller/models")).json() == []


async def test_silent_instances_are_marked_unhealthy_by_the_expiry_loop(registry):
    reg, _, client = registry
    await client.post("/api/controller/models", json=instance())
    deadline = time.monotonic() + 5
    while (await reg.list_instances())[0].healthy:
        assert time.monotonic() < deadline, "never expired"
        await asyncio.sleep(0.05)


async def test_long_poll_answers_as_soon_as_something_changes(registry):
    reg, _, client = registry
    first = await reg.wait_for_change(None, 1)
    assert await reg.wait_for_change((first.epoch, first.version), 0.05) is None
    waiting = asyncio.create_task(reg.wait_for_change((first.epoch, first.version), 10))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await client.post("/api/controller/models", json=instance())
    delta = await waiting
    assert time.monotonic() - started < 2  # liveness, not speed: a change wakes the poll
    # A listener that holds a version gets what changed since: a delta.
    assert (delta.since, delta.version) == (first.version, first.version + 1)
    assert [i.port for i in delta.upserts] == [18001] and delta.removed == ()


async def test_dbgpt_watcher_follows_a_controller_over_http(registry):
    _, url, client = registry
    dead_replica = f"http://127.0.0.1:{free_port()}"
    settings = DbgptSource(name="dbgpt", urls=[dead_replica, url], poll_interval=0.05)
    watcher = RegistryWatcher(settings, FAST_BACKOFF)
    try:
        status = await watcher.ready(5)
        assert status.ready and not status.stale
        await client.post("/api/controller/models", json=instance())
        snap = await watcher.listen(None, 5)
        while not snap.instances:
            await watcher.listen((snap.epoch, snap.version), 5)
            snap = watcher.snapshot()
        assert snap.instances[0].model_name == "chatgpt-test@llm"
    finally:
        await watcher.close()


async def test_polled_heartbeats_make_no_new_version_but_real_changes_do():
    """A DB-GPT controller moves last_heartbeat on every heartbeat; the watcher
    ships only changes that matter."""
    reg = EmbeddedRegistry(EmbeddedSource(port=0))
    url = await reg.ready()
    client = httpx.AsyncClient(base_url=url)
    await client.post("/api/controller/models", json=instance())
    await client.post("/api/controller/models", json=instance(port=18002))
    watcher = RegistryWatcher(DbgptSource(name="d", url=url, poll_interval=0.02), FAST_BACKOFF)
    try:
        await watcher.ready(5)
        held = watcher.snapshot()
        polls = (await watcher.status()).last_success
        for _ in range(5):
            await client.post("/api/controller/heartbeat", json=instance())
            await asyncio.sleep(0.05)
        assert (await watcher.status()).last_success > polls  # it did poll meanwhile
        assert watcher.snapshot().version == held.version
        assert await watcher.listen((held.epoch, held.version), 0.1) is None
        await client.delete("/api/controller/models", params={
            "model_name": "chatgpt-test@llm", "host": "127.0.0.1", "port": 18002, "remove_from_registry": "true"})
        delta = await watcher.listen((held.epoch, held.version), 5)
        assert delta.removed == (("chatgpt-test@llm", "127.0.0.1", 18002),) and delta.upserts == ()
    finally:
        await watcher.close()
        await client.aclose()
        await reg.close()


async def test_an_unreachable_source_keeps_the_last_snapshot_and_says_stale(registry):
    reg, url, client = registry
    await client.post("/api/controller/models", json=instance())
    watcher = RegistryWatcher(DbgptSource(name="d", url=url, poll_interval=0.05), FAST_BACKOFF)
    try:
        await watcher.ready(5)
        before = watcher.snapshot()
        assert len(before.instances) == 1
        await reg.close()  # the controller goes away
        deadline = time.monotonic() + 5
        while not (await watcher.status()).stale:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        status = await watcher.status()
        assert status.consecutive_failures >= 1 and "connection refused" in status.last_error
        assert watcher.snapshot() == before  # never emptied
    finally:
        await watcher.close()


async def test_a_source_down_from_the_start_is_never_answered_as_empty():
    """A watcher (re)started while its controller is down has nothing to say: a
    listener gets no answer (it keeps what it holds) rather than an empty
    snapshot that would retire every instance it had from this source. The
    status says stale and why. Once the controller answers, so does the watcher."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    watcher = RegistryWatcher(DbgptSource(name="d", url=url, poll_interval=0.05), FAST_BACKOFF)
    reg = None
    try:
        status = await watcher.ready(5)  # returns once the first fetch failed, saying so
        assert await watcher.listen(None, 0.3) is None  # not an empty snapshot
        assert not status.ready and status.stale and "connection refused" in status.last_error
        while status.consecutive_failures < 3:  # failed again, at the back-off's pace
            await asyncio.sleep(0.05)
            status = await watcher.status()
        assert await watcher.listen(None, 0.1) is None
        assert not (await watcher.status()).ready
        held = asyncio.create_task(watcher.listen(("an earlier epoch", 7), 10))  # a coordinator's copy
        await asyncio.sleep(0.2)
        assert not held.done()

        reg = EmbeddedRegistry(EmbeddedSource(port=port))  # the controller comes back, with an entry
        await reg.register(ModelInstance(**instance()))
        await reg.ready()
        snap = await held
        assert isinstance(snap, Snapshot) and [i.port for i in snap.instances] == [18001]
        status = await watcher.ready(5)
        assert status.ready and not status.stale and status.last_error is None
    finally:
        await watcher.close()
        if reg is not None:
            await reg.close()


async def test_a_restarting_registry_answers_no_watcher_before_its_saved_state_is_loaded():
    """Right after a restart the registry's store is empty because nothing is
    loaded yet: a watcher's first long poll waits for the saved entries (and is
    refused, not answered empty, if they take longer than its timeout)."""

    class SlowRestore(MemoryStateStore):
        def __init__(self, data: dict[str, bytes]) -> None:
            super().__init__()
            self.data, self.gate = data, asyncio.Event()

        async def get(self, key: str) -> bytes | None:
            await self.gate.wait()
            return await super().get(key)

    saved = MemoryStateStore()
    first = EmbeddedRegistry(EmbeddedSource(port=0), state=Journal(saved, "k"))
    await first.ready()
    await first.register(ModelInstance(**instance()))
    await first.close()

    store = SlowRestore(saved.data)
    again = EmbeddedRegistry(EmbeddedSource(port=0), state=Journal(store, "k"))
    try:
        with pytest.raises(RegistryUnavailable, match="not restored"):
            await again.wait_for_change(None, 0.1)
        early = asyncio.create_task(again.wait_for_change(None, 10))
        await asyncio.sleep(0.2)
        assert not early.done()
        store.gate.set()
        snap = await early
        assert [i.port for i in snap.instances] == [18001]
    finally:
        store.gate.set()
        await again.close()


async def test_a_watcher_survives_ten_thousand_failures_in_a_row():
    """The back-off is bounded arithmetic: 2 ** n overflowed a float after ~1,024
    failures and killed the loop for good. Here the source fails 10,000 times
    (the waits are recorded, not slept), then answers."""

    class Flaky:
        target = "flaky"

        def __init__(self, failures: int) -> None:
            self.failures = failures

        async def next(self, first: bool) -> Screened | None:
            if self.failures:
                self.failures -= 1
                raise SourceError("down")
            if not first:
                await asyncio.sleep(0.05)
                return None
            return Screened([ModelInstance(**instance(healthy=True))], [])

        async def close(self) -> None:
            pass

    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    backoff = BackoffSettings(initial=0.5, maximum=30)
    watcher = RegistryWatcher(StaticSource(name="f", instances=[]), backoff, source=Flaky(10_000), sleep=sleep)
    try:
        snap = await watcher.listen(None, 30)  # the first answer, once the source answers
        status = await watcher.status()
        assert snap is not None and status.ready and not status.stale, status
        assert [i.port for i in snap.instances] == [18001]
        assert len(waits) == 10_000 and waits[:3] == [0.5, 1.0, 2.0] and set(waits[7:]) == {30.0}
    finally:
        await watcher.close()


async def test_static_file_is_reread_when_it_changes_and_a_broken_file_is_stale(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump([instance(healthy=True)]))
    watcher = RegistryWatcher(StaticSource(name="s", path=path, poll_interval=0.05), FAST_BACKOFF)
    try:
        await watcher.ready(5)
        snap = watcher.snapshot()
        assert [i.port for i in snap.instances] == [18001]
        path.write_text(yaml.safe_dump({"instances": [instance(port=18001), instance(port=18002)]}))
        await watcher.listen((snap.epoch, snap.version), 5)
        snap = watcher.snapshot()
        assert [i.port for i in snap.instances] == [18001, 18002]
        # One bad entry among good ones is dropped, counted and named.
        path.write_text(yaml.safe_dump([instance(port=18001), instance(host="evil.com/x?", port=18003)]))
        await watcher.listen((snap.epoch, snap.version), 5)
        snap = watcher.snapshot()
        assert [i.port for i in snap.instances] == [18001]
        status = await watcher.status()
        assert status.rejected_entries == 1 and "evil.com/x?" in status.rejected_examples[0]
        # A file that cannot be read, or lists nothing valid, keeps the last snapshot.
        for broken in ("instances: [{", "instances: [{model_name: x, port: -1}]"):
            path.write_text(broken)
            deadline = time.monotonic() + 5
            while not (await watcher.status()).stale:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert "cannot read" in (await watcher.status()).last_error
            assert watcher.snapshot() == snap
            path.write_text(yaml.safe_dump([instance(port=18001), instance(host="evil.com/x?", port=18003)]))
            while (await watcher.status()).stale:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
    finally:
        await watcher.close()


async def test_inline_static_instances_are_published_once():
    source = StaticFileSource(StaticSource(instances=[instance()], poll_interval=0.01))
    assert len((await source.next(first=True)).instances) == 1
    assert await source.next(first=False) is None


async def test_controller_answering_garbage_is_a_source_error(registry):
    def garbage(request):
        return httpx.Response(200, json=[{"model_name": "x"}])

    source = DbgptControllerSource(DbgptSource(url="http://c:1"), transport=httpx.MockTransport(garbage))
    with pytest.raises(Exception, match="http://c:1"):
        await source.next(first=True)


async def test_deregister_with_an_empty_remove_flag_means_false(registry):
    """DB-GPT's worker, with no model storage, deregisters with
    `remove_from_registry=` (no value); its own controller answers 422 and the
    model is never stopped. Here it means false: marked unhealthy, kept."""
    _, _, client = registry
    await client.post("/api/controller/models", json=instance())
    r = await client.delete("/api/controller/models?model_name=chatgpt-test%40llm&host=127.0.0.1"
                            "&port=18001&remove_from_registry=")
    assert r.status_code == 200 and r.json() is True
    [kept] = (await client.get("/api/controller/models")).json()
    assert kept["healthy"] is False
