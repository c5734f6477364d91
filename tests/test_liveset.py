"""Pure decisions about the live set: merging sources (whole and change by
change), which endpoints appear and leave, targets."""

from __future__ import annotations

from datetime import datetime

from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.changes import ChangeLog, identity
from coordinator.core.liveset import (
    LiveSet,
    as_listed,
    apply_targets,
    filter_instances,
    manager_endpoints,
    merge_sources,
)
from coordinator.core.models import Endpoint, ModelInstance


def inst(key: str, port: int, healthy: bool = True, beat: int | None = None, host: str = "h") -> ModelInstance:
    return ModelInstance(
        model_name=key, host=host, port=port, healthy=healthy,
        last_heartbeat=datetime.fromtimestamp(beat) if beat else None,
    )


def test_same_entry_in_two_sources_appears_once_preferring_the_healthy_one():
    merged = merge_sources(
        {"a": [inst("m@llm", 1, healthy=False, beat=200)], "b": [inst("m@llm", 1, healthy=True, beat=100)]}
    )
    assert len(merged) == 1 and merged[0].healthy


def test_among_equally_healthy_duplicates_the_newer_heartbeat_wins():
    merged = merge_sources({"a": [inst("m@llm", 1, beat=100)], "b": [inst("m@llm", 1, beat=200)]})
    assert merged[0].last_heartbeat == datetime.fromtimestamp(200)


instances = st.lists(
    st.builds(
        inst,
        key=st.sampled_from(["a@llm", "b@llm", "WorkerManager@service"]),
        port=st.integers(1, 4),
        healthy=st.booleans(),
        beat=st.one_of(st.none(), st.integers(1, 10**6)),
    ),
    max_size=12,
)


@given(st.dictionaries(st.sampled_from(["x", "y", "z"]), instances))
def test_merge_is_deterministic_and_loses_no_entry(snapshots):
    merged = merge_sources(snapshots)
    wanted = {i.identity for insts in snapshots.values() for i in insts}
    assert {i.identity for i in merged} == wanted
    assert len(merged) == len(wanted)
    assert merge_sources(dict(reversed(list(snapshots.items())))) == merged


def test_live_set_says_which_endpoints_appeared_and_left():
    live = LiveSet(["a", "b"])
    a, b = ChangeLog(identity), ChangeLog(identity)
    a.put(inst("m@llm", 1))
    a.put(inst("n@llm", 1))
    assert live.absorb("a", a.since(None)) == (
        {Endpoint("h", 1)}, {"m@llm", "n@llm"}, {("m@llm", "h", 1), ("n@llm", "h", 1)})
    b.put(inst("m@llm", 1))
    b.put(inst("m@llm", 2))
    position = b.position
    assert live.absorb("b", b.since(None)).endpoints == {Endpoint("h", 2)}  # h:1 was there already
    b.remove(("m@llm", "h", 2))
    assert live.absorb("b", b.since(position)) == ({Endpoint("h", 2)}, {"m@llm"}, {("m@llm", "h", 2)})
    assert not live.has_endpoint(Endpoint("h", 2))
    assert live.listed_by(Endpoint("h", 1)) == ["a", "b"]
    a.replace([])
    live.absorb("a", a.since(None))
    assert live.has_endpoint(Endpoint("h", 1)) and live.listed_by(Endpoint("h", 1)) == ["b"]
    assert [i.identity for i in live.instances()] == [("m@llm", "h", 1)]
    assert live.of_key("n@llm") == []
    assert live.keys_at(Endpoint("h", 1)) == {"m@llm"} and live.keys_at(Endpoint("h", 2)) == set()


def test_apply_targets_every_registered_instance_healthy_or_not():
    live = [inst("m@llm", 2, healthy=False), inst("m@llm", 1), inst("m@text2vec", 3), inst("n@llm", 4)]
    assert apply_targets(live, "m", "llm") == [Endpoint("h", 1), Endpoint("h", 2)]
    assert apply_targets(live, "m", "text2vec") == [Endpoint("h", 3)]
    assert apply_targets(live, "absent", "llm") == []


def test_supports_goes_to_healthy_worker_managers_only():
    live = [inst("WorkerManager@service", 1), inst("WorkerManager@service", 2, healthy=False), inst("m@llm", 3)]
    assert manager_endpoints(live) == [Endpoint("h", 1)]
    assert manager_endpoints(live, healthy_only=False) == [Endpoint("h", 1), Endpoint("h", 2)]


def test_healthy_means_registry_healthy_and_not_found_unreachable_or_drained():
    live = [inst("m@llm", 1), inst("m@llm", 2), inst("m@llm", 3, healthy=False)]
    shown = [as_listed(i, {Endpoint("h", 2)}, set()) for i in live]
    found = filter_instances(shown, "m", "llm", healthy_only=True)
    assert [i.port for i in found] == [1]
    assert live[1].healthy  # the entry's own state is left as it is
    assert not as_listed(inst("m@llm", 4), set(), {("m@llm", "h", 4)}).healthy  # drained
    assert len(filter_instances(live, "m", None, healthy_only=False)) == 3
    assert filter_instances(live, "m", "text2vec", healthy_only=False) == []


unique_listings = st.dictionaries(
    st.sampled_from(["x", "y", "z"]),
    instances.map(lambda insts: list({i.identity: i for i in insts}.values())),
)


@given(st.lists(unique_listings, min_size=1, max_size=6), st.booleans())
def test_live_set_absorbing_changes_equals_merging_the_latest_listings(steps, as_deltas):
    """Whatever the order of changes, and whether they come as deltas or
    snapshots, the live set is what merging every source's latest listing gives."""
    live = LiveSet(["x", "y", "z"])
    logs = {s: ChangeLog(identity) for s in ("x", "y", "z")}
    positions: dict[str, tuple[str, int] | None] = dict.fromkeys(logs)
    latest: dict[str, list[ModelInstance]] = {}
    for step in steps:
        for source, listing in step.items():
            logs[source].replace(listing)
            change = logs[source].since(positions[source] if as_deltas else None)
            if change is not None:
                live.absorb(source, change)
                positions[source] = logs[source].position
            latest[source] = listing
    assert live.instances() == merge_sources(latest)
    assert live.endpoints() == {i.endpoint for i in merge_sources(latest)}
