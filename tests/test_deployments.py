"""The reconciler's decision, as a table of cases: no Ray, no I/O, no clock."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from coordinator.core.deployments import Backoff, Deployment, Manager, Seen, View, backed_off, decide, params_at
from coordinator.core.models import Endpoint

A, B, C, D = (Endpoint("10.0.0.1", 18001), Endpoint("10.0.0.2", 18001), Endpoint("10.0.0.3", 18001),
              Endpoint("10.0.0.1", 18002))


def mgr(ep: Endpoint, models: int = 0, eligible: bool = True) -> Manager:
    return Manager(ep, eligible, models)


def up(ep: Endpoint) -> Seen:
    return Seen(ep, True, True)


def spec(replicas: int, **kw) -> Deployment:
    return Deployment(model="qwen", replicas=replicas, **kw)


def starts(decision) -> list[Endpoint]:
    return [a.endpoint for a in decision.actions if a.kind == "start"]


def stops(decision) -> list[Endpoint]:
    return [a.endpoint for a in decision.actions if a.kind == "stop"]


def test_scale_up_from_nothing_spreads_over_hosts_then_load():
    # D shares A's host: after A takes one replica, B and C's hosts come first.
    view = View(instances=[], managers=[mgr(A), mgr(B, models=2), mgr(C), mgr(D)])
    d = decide(spec(3), view)
    assert starts(d) == [A, C, B] and d.state == "progressing"


def test_fewest_models_first():
    view = View(instances=[], managers=[mgr(A, models=3), mgr(B, models=1), mgr(C, models=2)])
    assert starts(decide(spec(1), view)) == [B]


def test_never_two_replicas_on_one_manager():
    view = View(instances=[up(A)], managers=[mgr(A, models=1)])
    d = decide(spec(2), view)
    assert d.actions == [] and d.state == "degraded" and "no other eligible worker manager" in d.why


def test_ready_when_count_matches():
    view = View(instances=[up(A), up(B)], managers=[mgr(A, 1), mgr(B, 1), mgr(C)])
    assert decide(spec(2), view)[:3] == (([], "ready", None))


def test_a_dead_instance_counts_as_missing_and_is_replaced_elsewhere():
    # B's worker is unreachable (the registry still lists it healthy): its manager is not eligible either.
    view = View(instances=[up(A), Seen(B, True, False)],
                managers=[mgr(A, 1), mgr(B, 1, eligible=False), mgr(C)])
    d = decide(spec(2), view)
    assert starts(d) == [C] and "not ready: 10.0.0.2:18001" in d.why


def test_registry_unhealthy_counts_as_missing():
    view = View(instances=[up(A), Seen(B, False, True)], managers=[mgr(A, 1), mgr(B), mgr(C, 1)])
    # B's manager is up and runs nothing: the model starts there again.
    assert starts(decide(spec(2), view)) == [B]


def test_a_returning_instance_scales_back_busiest_first():
    view = View(instances=[up(A), up(B), up(C)], managers=[mgr(A, 1), mgr(B, 3), mgr(C, 1)])
    d = decide(spec(2), view)
    assert stops(d) == [B] and not starts(d)


def test_scale_down_ties_go_to_the_host_with_more_replicas():
    view = View(instances=[up(A), up(B), up(D)], managers=[mgr(A, 1), mgr(B, 1), mgr(D, 1)])
    assert stops(decide(spec(1), view)) == [D, A]


def test_replicas_zero_stops_every_ready_instance():
    view = View(instances=[up(A), Seen(B, False, True)], managers=[mgr(A, 1), mgr(B)])
    assert stops(decide(spec(0), view)) == [A]


def test_starts_in_flight_count_and_nothing_more_is_sent():
    view = View(instances=[], managers=[mgr(A), mgr(B), mgr(C)], starting=frozenset({A}))
    d = decide(spec(2), view)
    assert starts(d) == [B]
    view = View(instances=[], managers=[mgr(A), mgr(B)], starting=frozenset({A, B}))
    assert decide(spec(2), view)[:3] == ([], "progressing", "2 starting")


def test_no_scale_down_while_starts_are_in_flight():
    view = View(instances=[up(A), up(B)], managers=[mgr(A, 1), mgr(B, 1), mgr(C)], starting=frozenset({C}))
    assert decide(spec(2), view).actions == []


def test_backoff_skips_a_failing_manager_and_prefers_another():
    view = View(instances=[], managers=[mgr(A), mgr(B, models=5)],
                backoff={A: Backoff(1, retry_at=105.0, last_error="A: HTTP 500")}, now=100.0)
    assert starts(decide(spec(1), view)) == [B]
    # Its backoff over, A is tried again — after a manager that never failed.
    later = View(instances=[], managers=[mgr(A), mgr(B, models=5), mgr(C)],
                 backoff={A: Backoff(1, retry_at=105.0, last_error="x")}, now=106.0)
    assert starts(decide(spec(1), later)) == [C]  # as loaded as A, never failed
    assert starts(decide(spec(2), later)) == [C, A]
    assert starts(decide(spec(1), View(instances=[], managers=[mgr(A), mgr(B, models=5)],
                                       backoff=later.backoff, now=106.0))) == [A]  # fewer models first


def test_every_manager_backing_off_is_failing_with_the_workers_message():
    view = View(instances=[], managers=[mgr(A)],
                backoff={A: Backoff(3, retry_at=200.0, last_error="10.0.0.1:18001: HTTP 500: unknown provider")},
                now=100.0)
    d = decide(spec(1), view)
    assert d.actions == [] and d.state == "failing" and "unknown provider" in d.why


def test_hosts_restrict_placement():
    view = View(instances=[], managers=[mgr(A), mgr(B), mgr(C)])
    assert starts(decide(spec(2, hosts=["10.0.0.3:18001", "10.0.0.1:18001"]), view)) == [A, C]
    d = decide(spec(2, hosts=["10.0.0.3:18001"]), view)
    assert starts(d) == [C] and d.state == "progressing"
    d = decide(spec(1, hosts=["10.0.0.9:1"]), view)
    assert d.state == "degraded" and "10.0.0.9:1" in d.why


def test_unreachable_or_unhealthy_managers_are_not_eligible():
    view = View(instances=[], managers=[mgr(A, eligible=False), mgr(B)])
    assert starts(decide(spec(2), view)) == [B]


def test_changed_params_roll_once_the_count_is_right():
    view = View(instances=[up(A), up(B)], managers=[mgr(A, 1), mgr(B, 1)], params_current=False)
    d = decide(spec(2), view)
    assert [a.kind for a in d.actions] == ["update_params"]
    short = View(instances=[up(A)], managers=[mgr(A, 1), mgr(B)], params_current=False)
    assert [a.kind for a in decide(spec(2), short).actions] == ["start"]  # the new one starts with the new params
    failed = View(instances=[up(A), up(B)], managers=[mgr(A, 1), mgr(B, 1)], params_current=False,
                  backoff={None: Backoff(1, retry_at=50.0, last_error="HTTP 500")}, now=10.0)
    assert decide(spec(2), failed).state == "failing"


def test_backoff_doubles_up_to_its_maximum():
    b = None
    delays = []
    for _ in range(12):
        b = backed_off(b, 0.0, "boom", initial=1.0, maximum=300.0)
        delays.append(b.retry_at)
    assert delays[:5] == [1, 2, 4, 8, 16] and max(delays) == 300 and b.failures == 12


def test_bad_specs_name_the_field():
    with pytest.raises(ValidationError, match="replicas"):
        Deployment(model="m", replicas=-1)
    with pytest.raises(ValidationError, match="hosts"):
        Deployment(model="m", replicas=1, hosts=["no-port"])
    with pytest.raises(ValidationError, match="worker_type"):
        Deployment(model="m", replicas=1, worker_type="gpu")
    with pytest.raises(ValidationError, match="max_unavailable"):
        Deployment(model="m", replicas=1, max_unavailable=0)
    with pytest.raises(ValidationError, match="replica"):
        Deployment(model="m", replica=1)  # a typo is refused, not ignored


def test_a_stopped_instance_the_registry_still_lists_is_not_stopped_twice():
    # A's stop succeeded; the registry has not caught up and still lists it healthy.
    view = View(instances=[up(A), up(B)], managers=[mgr(A, 1), mgr(B, 1)], stopping=frozenset({A}))
    assert decide(spec(1), view)[:3] == ([], "ready", None)


def kinds(decision) -> list[tuple[str, Endpoint | None]]:
    return [(a.kind, a.endpoint) for a in decision.actions]


def test_a_surge_roll_of_one_replica_starts_the_new_one_first_then_stops_the_old_then_adopts():
    managers = [mgr(A, 1), mgr(B)]
    surge = spec(1, max_surge=1)
    # Params changed: the new instance starts beside the old one, on another manager.
    step = decide(surge, View(instances=[up(A)], managers=managers, params_current=False))
    assert kinds(step) == [("start", B)] and "starting 1 with the new params" in step.why
    # While it starts, the old one keeps serving: nothing is stopped.
    step = decide(surge, View(instances=[up(A)], managers=managers, params_current=False, starting=frozenset({B}),
                              fresh=frozenset({B})))
    assert step.actions == [] and step.state == "progressing"
    # Ready: the old one goes (drained by the stop).
    both = View(instances=[up(A), up(B)], managers=[mgr(A, 1), mgr(B, 1)], params_current=False,
                fresh=frozenset({B}))
    assert kinds(decide(surge, both)) == [("stop", A)]
    # Only fresh ones are left: the params are adopted, nothing is sent.
    done = View(instances=[up(B)], managers=[mgr(A), mgr(B, 1)], params_current=False, fresh=frozenset({B}))
    assert kinds(decide(surge, done)) == [("adopt", None)]


def test_a_surge_never_stops_a_fresh_instance_and_starts_at_most_max_surge_at_once():
    managers = [mgr(A, 1), mgr(B, 1), mgr(C), mgr(D)]
    s = spec(2, max_surge=1)
    step = decide(s, View(instances=[up(A), up(B)], managers=managers, params_current=False))
    assert [k for k, _ in kinds(step)] == ["start"] and len(step.actions) == 1
    # Three ready (one fresh) for two wanted: an old one is stopped, never the fresh one.
    step = decide(s, View(instances=[up(A), up(B), up(C)], managers=managers, params_current=False,
                          fresh=frozenset({C})))
    assert kinds(step) == [("stop", A)]


def test_a_surge_with_no_free_manager_updates_in_place():
    step = decide(spec(1, max_surge=1), View(instances=[up(A)], managers=[mgr(A, 1)], params_current=False))
    assert kinds(step) == [("update_params", None)]


def test_max_surge_defaults_to_in_place_updates_and_cannot_be_negative():
    assert kinds(decide(spec(1), View(instances=[up(A)], managers=[mgr(A, 1), mgr(B)], params_current=False))) == [
        ("update_params", None)]
    with pytest.raises(ValidationError):
        spec(1, max_surge=-1)


@pytest.mark.parametrize(
    ("applied", "wanted", "started", "present", "current", "fresh"),
    [
        ("old", "old", {}, {A, B}, True, set()),  # nothing changed
        ("old", "new", {B: "new"}, {A, B}, False, {B}),  # a surge under way: B has the new params
        ("old", "third", {B: "new"}, {A, B}, False, set()),  # other params again mid-surge: both replaced
        # Deployed back to what runs, mid-surge: B (ready or starting) runs neither, A is right.
        ("old", "old", {B: "new"}, {A, B}, False, {A}),
        ("old", "old", {B: "new"}, {A}, True, set()),  # ... and once B is gone, all is well
        ("old", "new", {B: "new"}, {A, B}, False, {B}),  # forth once more: B is not replaced again
    ],
)
def test_params_at_says_which_instances_run_the_wanted_params(applied, wanted, started, present, current, fresh):
    assert params_at(applied, wanted, started, present) == (current, frozenset(fresh))


def test_deployed_back_mid_surge_the_instances_the_surge_started_are_replaced():
    one = spec(1, max_surge=1)
    # A surge to new params had started B beside A; the old params are deployed back.
    current, fresh = params_at("old", "old", {B: "new"}, {A, B})
    back = View(instances=[up(A), up(B)], managers=[mgr(A, 1), mgr(B, 1)], params_current=current, fresh=fresh)
    assert kinds(decide(one, back)) == [("stop", B)]  # not A, which ranks first otherwise
    # Two replicas, one old one already replaced by B: a new one with the old params, then B goes.
    two = spec(2, max_surge=1)
    current, fresh = params_at("old", "old", {B: "new"}, {A, B})
    managers = [mgr(A, 1), mgr(B, 1), mgr(C)]
    assert kinds(decide(two, View(instances=[up(A), up(B)], managers=managers, params_current=current,
                                  fresh=fresh))) == [("start", C)]
    current, fresh = params_at("old", "old", {B: "new"}, {A, B, C})
    assert kinds(decide(two, View(instances=[up(A), up(B), up(C)], managers=managers, params_current=current,
                                  fresh=fresh))) == [("stop", B)]


def test_a_scale_down_stops_an_instance_on_other_params_first():
    # In place (no surge): A was started with params no longer wanted, B has them.
    view = View(instances=[up(A), up(B)], managers=[mgr(A, 1), mgr(B, 1)], params_current=False,
                fresh=frozenset({B}))
    assert kinds(decide(spec(1), view)) == [("stop", A)]  # B ranks first otherwise
    assert kinds(decide(spec(1), View(instances=[up(A), up(B)], managers=[mgr(A, 1), mgr(B, 1)]))) == [("stop", B)]
