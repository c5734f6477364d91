"""The registry's state machine, stepped with a fake clock (no sleeping)."""

from __future__ import annotations

from actors.registry_store import RegistryStore
from tests.conftest import ROOT
from coordinator.core.models import ModelInstance


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


def saved(store: RegistryStore) -> list[dict]:
    return [i.model_dump(mode="json") for i in store.query()]


def test_load_restores_entries():
    store = RegistryStore(15, Clock())
    store.register(entry("a@llm"))
    store.register(entry("b@llm", port=2))
    copy = RegistryStore(15, Clock())
    copy.load(saved(store))
    assert copy.query() == store.query()


def test_saved_entries_that_are_no_longer_valid_are_dropped_on_load_not_fatal():
    # A state saved by an older version whose rules were looser.
    store = RegistryStore(15, Clock())
    store.register(entry("a@llm"))
    entries = saved(store)
    entries.append({**entries[0], "host": "evil.com/x?"})
    copy = RegistryStore(15, Clock())
    dropped = copy.load(entries)
    assert copy.query() == store.query()
    assert len(dropped) == 1 and "evil.com/x?" in dropped[0]
    # nothing valid left: an empty registry, still no error
    assert len(RegistryStore(15, Clock()).load(entries[1:])) == 1


def test_every_visible_change_is_in_the_change_log_and_heartbeats_are_not():
    clock = Clock()
    store = RegistryStore(15, clock)
    store.register(entry("a@llm"))
    position = store.changes.position
    clock.now += 5
    store.heartbeat(entry("a@llm"))  # only the heartbeat time moves
    assert store.changes.since(position) is None
    store.deregister("a@llm", "127.0.0.1", 1, remove=False)
    store.heartbeat(entry("a@llm"))  # revives: visible
    store.register(entry("b@llm"))
    delta = store.changes.since(position)
    assert sorted(i.model_name for i in delta.upserts) == ["a@llm", "b@llm"]
    assert all(i.healthy for i in delta.upserts)


def lines_run(fn) -> int:
    """How many lines of the project's Python ``fn`` runs: an operation count
    that does not depend on the machine's speed. (The collector is held off:
    a finaliser left by another test must not count here.)"""
    import gc
    import sys

    count = 0
    ours = (str(ROOT / "actors"), str(ROOT / "coordinator"))

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line" and frame.f_code.co_filename.startswith(ours):
            count += 1
        return tracer

    gc.disable()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
        gc.enable()
    return count


def test_writes_cost_the_same_whatever_the_registry_size():
    """Register, heartbeat, deregister and an expiry pass with nothing due run
    the same number of lines in a registry of 10 entries and of 10,000."""
    costs = []
    for size in (10, 10_000):
        clock = Clock()
        store = RegistryStore(60, clock)
        for i in range(size):
            store.register(entry(f"m{i}@llm", port=1 + i % 50))
        clock.now += 1
        costs.append((
            lines_run(lambda: store.register(entry("new@llm", port=7))),
            lines_run(lambda: store.heartbeat(entry("m3@llm", port=4))),
            lines_run(lambda: store.heartbeat(entry("new@llm", port=7))),
            lines_run(lambda: store.deregister("m5@llm", "127.0.0.1", 6, remove=False)),
            lines_run(lambda: store.deregister("new@llm", "127.0.0.1", 7, remove=True)),
            lines_run(store.expire),
        ))
    assert costs[0] == costs[1]


def test_an_expiry_pass_looks_only_at_the_entries_that_are_due():
    clock = Clock()
    store = RegistryStore(60, clock)
    for i in range(1000):
        store.register(entry(f"m{i}@llm"))
        clock.now += 0.01  # registered 10 ms apart
    clock.now += 51.0  # the first ~100 are overdue
    one = lines_run(lambda: store.expire())
    assert 90 <= len(store.query()) - len(store.query(healthy_only=True)) <= 110
    clock.now += 0.001
    assert lines_run(store.expire) < one / 50  # nothing (or next to nothing) due: a glance


def test_entries_at_an_unreachable_endpoint_are_listed_unhealthy_until_it_answers():
    store = RegistryStore(heartbeat_timeout=60, clock=Clock())
    store.register(entry("m@llm", port=1))
    store.register(entry("WorkerManager@service", port=1))
    store.register(entry("m@llm", port=2))
    before = store.changes.version
    assert store.set_unreachable([("127.0.0.1", 1)]) == 2
    # DB-GPT's readers see it; the coordinator's watcher does not hear its own word back.
    assert store.changes.version == before
    assert [i.port for i in store.query("m@llm", healthy_only=True)] == [2]
    assert {(i.model_name, i.healthy) for i in store.query() if i.port == 1} == {
        ("m@llm", False), ("WorkerManager@service", False)}
    # A heartbeat alone never revives what the probes find dead.
    store.heartbeat(entry("m@llm", port=1))
    store.register(entry("m@llm", port=1))
    assert [i.port for i in store.query("m@llm", healthy_only=True)] == [2]
    # The probes find it answering again: listed as its heartbeats say.
    assert store.set_unreachable([]) == 2
    assert [i.port for i in store.query("m@llm", healthy_only=True)] == [1, 2]
    # A verdict that changes nothing changes nothing.
    assert store.set_unreachable([]) == 0 and store.changes.version == before


def test_an_entry_deregistered_or_expired_while_unreachable_stays_unhealthy_after():
    clock = Clock()
    store = RegistryStore(heartbeat_timeout=3, clock=clock)
    store.register(entry("m@llm", port=1))
    store.set_unreachable([("127.0.0.1", 1)])
    clock.now += 10
    store.expire()
    store.set_unreachable([])
    assert store.query("m@llm", healthy_only=True) == []  # its own state: expired


def test_the_change_log_holds_the_entries_own_state_not_the_coordinators_word():
    """The coordinator's watcher follows the change log: its own word (drained,
    unreachable) never comes back to it late, as an echo, yet what the entry
    itself does meanwhile does."""
    store = RegistryStore(heartbeat_timeout=60, clock=Clock())
    store.register(entry("m@llm", port=1))
    before = store.changes.version
    store.set_unreachable([], draining=[("m@llm", "127.0.0.1", 1)])
    assert store.query("m@llm", healthy_only=True) == []  # DB-GPT's servers stop choosing it
    assert store.changes.version == before
    assert [i.healthy for i in store.changes.since(None).instances] == [True]
    store.deregister("m@llm", "127.0.0.1", 1, remove=False)  # the worker's own word, during the drain
    assert store.changes.version > before
    assert [i.healthy for i in store.changes.since(None).instances] == [False]
    store.register(entry("m@llm", port=1))
    store.set_unreachable([])  # the drain is over
    assert [i.healthy for i in store.query("m@llm")] == [True]
    assert [i.healthy for i in store.changes.since(None).instances] == [True]
