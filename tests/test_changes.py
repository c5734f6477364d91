"""The change feed: versioned deltas, with a snapshot for a listener that is new,
from another epoch, or too far behind."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core.changes import ChangeLog, Delta, Snapshot


def key(value: tuple[str, int]) -> str:
    return value[0]


def test_a_new_listener_gets_a_snapshot_and_a_caught_up_one_gets_nothing():
    log = ChangeLog(key)
    log.put(("a", 1))
    log.put(("b", 1))
    snap = log.since(None)
    assert isinstance(snap, Snapshot) and snap.instances == (("a", 1), ("b", 1)) and snap.version == 2
    assert log.since(log.position) is None


def test_a_delta_carries_only_what_changed_with_current_values():
    log = ChangeLog(key)
    for name in "abcdefghij":
        log.put((name, 0))
    position = log.position
    log.put(("c", 1))
    log.put(("c", 2))  # twice: sent once, as it is now
    log.remove("d")
    log.put(("z", 0))
    delta = log.since(position)
    assert isinstance(delta, Delta)
    assert (delta.since, delta.version) == (10, 14)
    assert sorted(delta.upserts) == [("c", 2), ("z", 0)]
    assert delta.removed == ("d",)


def test_writing_an_equal_value_is_no_change():
    log = ChangeLog(key)
    assert log.put(("a", 1))
    assert not log.put(("a", 1))
    assert not log.remove("nothing")
    assert log.version == 1


def test_a_listener_further_behind_than_the_log_reaches_gets_a_snapshot():
    log = ChangeLog(key, retain=4)
    log.put(("a", 0))
    position = log.position
    for i in range(1, 5):
        log.put(("a", i))
    assert isinstance(log.since(position), Delta)  # exactly 4 behind
    log.put(("a", 5))
    assert isinstance(log.since(position), Snapshot)


def test_a_listener_from_another_epoch_gets_a_snapshot():
    log = ChangeLog(key)
    log.put(("a", 0))
    assert isinstance(log.since(("another-epoch", 1)), Snapshot)
    assert isinstance(log.since((log.epoch, 99)), Snapshot)  # from the future: start over


ops = st.lists(
    st.tuples(st.sampled_from(["put", "remove"]), st.sampled_from("abcdefgh"), st.integers(0, 3)),
    max_size=40,
)


@settings(max_examples=300)
@given(st.lists(ops, min_size=1, max_size=8), st.integers(1, 16))
def test_deltas_applied_in_order_reproduce_the_log_exactly(batches, retain):
    """A follower that polls between batches of writes — getting deltas, or a
    snapshot when it fell too far behind — always ends up holding exactly what
    the log holds, at the same version."""
    log = ChangeLog(key, retain=retain)
    follower = ChangeLog(key)
    position = None
    for batch in batches:
        for op, name, value in batch:
            log.put((name, value)) if op == "put" else log.remove(name)
        change = log.since(position)
        if change is None:
            continue
        if isinstance(change, Delta):
            assert change.since == position[1]
            assert len(change.upserts) + len(change.removed) <= min(log.version - position[1], 8)
        follower.apply(change)
        position = (change.epoch, change.version)
        assert dict(follower.items()) == dict(log.items())
    assert log.since(position) is None


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 2)), max_size=20),
       st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 2)), max_size=20))
def test_replace_records_only_the_entries_that_differ(first, second):
    log = ChangeLog(key)
    log.replace(dict(first).items())
    before = dict(log.items())
    changed = log.replace(dict(second).items())
    after = dict(log.items())
    assert after == {k: (k, v) for k, v in dict(second).items()}
    assert sorted(changed) == sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
