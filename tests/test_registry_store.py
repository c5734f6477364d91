"""The registry's state machine, stepped with a fake clock (no sleeping)."""

from __future__ import annotations

from actors.registry_store import RegistryStore
from coordinator.models import ModelInstance


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def entry(key: str = "m@llm", port: int = 1, **kw) -> ModelInstance:
    return ModelInstance(model_name=key, host="127.0.0.1", port=port, **kw)


def test_register_marks_healthy_and_stamps_the_heartbeat():
    clock = Clock()
    store = RegistryStore(15, clock)
    assert store.register(entry(healthy=False))
    [got] = store.query()
    assert got.healthy and got.last_heartbeat.timestamp() == clock.now
    assert store.version == 1


def test_reregistering_the_same_entry_changes_nothing_visible():
    store = RegistryStore(15, Clock())
    store.register(entry())
    assert not store.register(entry())
    assert store.version == 1 and len(store) == 1


def test_heartbeat_from_an_unknown_instance_registers_it():
    store = RegistryStore(15, Clock())
    assert store.heartbeat(entry())
    assert store.query(healthy_only=True)


def test_heartbeats_from_known_healthy_instances_bump_no_version():
    clock = Clock()
    store = RegistryStore(15, clock)
    store.register(entry())
    clock.now += 5
    assert not store.heartbeat(entry())
    assert store.version == 1
    assert store.query()[0].last_heartbeat.timestamp() == clock.now


def test_missed_heartbeats_mark_unhealthy_but_keep_the_entry():
    clock = Clock()
    store = RegistryStore(15, clock)
    store.register(entry())
    store.register(entry(port=2, check_healthy=False))
    clock.now += 14
    assert store.expire() == []
    clock.now += 2
    [expired] = store.expire()
    assert expired.port == 1 and not expired.healthy
    assert len(store) == 2
    assert [i.port for i in store.query(healthy_only=True)] == [2]  # check_healthy=False never expires
    store.heartbeat(entry())
    assert len(store.query(healthy_only=True)) == 2


def test_deregister_marks_unhealthy_or_removes_when_asked():
    store = RegistryStore(15, Clock())
    store.register(entry())
    assert store.deregister("m@llm", "127.0.0.1", 1, remove=False)
    assert store.query()[0].healthy is False
    assert store.deregister("m@llm", "127.0.0.1", 1, remove=True)
    assert store.query() == []
    assert not store.deregister("m@llm", "127.0.0.1", 1, remove=True)


def test_query_filters_by_key_and_health():
    store = RegistryStore(15, Clock())
    store.register(entry("a@llm"))
    store.register(entry("b@llm"))
    store.deregister("b@llm", "127.0.0.1", 1, remove=False)
    assert [i.model_name for i in store.query("a@llm")] == ["a@llm"]
    assert [i.model_name for i in store.query(healthy_only=True)] == ["a@llm"]


def test_dump_and_load_restore_entries_and_version():
    store = RegistryStore(15, Clock())
    store.register(entry("a@llm"))
    store.register(entry("b@llm", port=2))
    copy = RegistryStore(15, Clock())
    copy.load(store.dump())
    assert copy.query() == store.query() and copy.version == store.version


def test_saved_entries_that_are_no_longer_valid_are_dropped_on_load_not_fatal():
    # A state saved by an older version whose rules were looser.
    store = RegistryStore(15, Clock())
    store.register(entry("a@llm"))
    state = store.dump()
    state["entries"].append({**state["entries"][0], "host": "evil.com/x?"})
    copy = RegistryStore(15, Clock())
    dropped = copy.load(state)
    assert copy.query() == store.query()
    assert len(dropped) == 1 and "evil.com/x?" in dropped[0]
    state["entries"] = state["entries"][1:]  # nothing valid left: an empty registry, still no error
    assert len(RegistryStore(15, Clock()).load(state)) == 1
