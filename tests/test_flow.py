"""Flow control's scheduler (coordinator/core/flow.py), pure: table tests of
each rule, and hypothesis properties — no starvation (every waiting request is
admitted or refused by its deadline), capacity, limits, bounds and priorities
held after every step, and tenants' shares within one admission of their
weights while they compete (a noisy tenant at 10x the rate gets its share,
not 10x)."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core.flow import (
    Admitted,
    FlowPolicy,
    FlowRequest,
    FlowScheduler,
    Queued,
    Refused,
    Share,
    tokens_of,
    tokens_spent,
)

INF = float("inf")


def scheduler(capacity: int = 1, max_queued: int = 100, **kwargs) -> FlowScheduler:
    return FlowScheduler(FlowPolicy(capacity=capacity, max_queued=max_queued, **kwargs))


ids = itertools.count()


def req(tenant: str, pool: str = "m", priority: int = 0, cost: float = 1.0, deadline: float = INF) -> FlowRequest:
    return FlowRequest(next(ids), tenant, pool, priority, cost, deadline)


def verdict(s: FlowScheduler, r: FlowRequest, now: float = 0.0) -> type:
    return type(s.offer(r, now).verdict)


def admitted(decisions) -> list[FlowRequest]:
    return [d.request for d in decisions if isinstance(d, Admitted)]


# ---- table tests --------------------------------------------------------


def test_admits_up_to_capacity_then_queues_and_a_release_admits_the_next():
    s = scheduler(capacity=2)
    a, b, c = req("t"), req("t"), req("t")
    assert [verdict(s, r) for r in (a, b, c)] == [Admitted, Admitted, Queued]
    assert (s.in_flight(), s.queued()) == (2, 1)
    assert admitted(s.release(a.id, 1)) == [c]
    assert s.release(a.id, 1) == []  # released twice: ignored


def test_each_pool_has_its_own_capacity():
    s = scheduler(capacity=1, capacities={"big": 2})
    assert [verdict(s, req("t", "small")) for _ in range(2)] == [Admitted, Queued]
    assert [verdict(s, req("t", "big")) for _ in range(3)] == [Admitted, Admitted, Queued]
    assert verdict(s, req("t", "other")) is Admitted  # a full pool holds back no other


def test_a_quiet_tenant_goes_before_a_noisy_ones_earlier_requests():
    s = scheduler(capacity=1)
    first = req("noisy")
    s.offer(first, 0)
    noisy = [req("noisy") for _ in range(5)]
    for r in noisy:
        s.offer(r, 0)
    quiet = req("quiet")
    assert verdict(s, quiet) is Queued
    assert admitted(s.release(first.id, 1)) == [quiet]
    assert admitted(s.release(quiet.id, 2)) == [noisy[0]]


def test_a_higher_priority_goes_first_whatever_its_tenant_has_used():
    s = scheduler(capacity=1)
    running = req("hog", priority=5)
    s.offer(running, 0)
    low = req("quiet", priority=0)
    high = [req("hog", priority=5) for _ in range(2)]
    s.offer(low, 0)
    for r in high:
        s.offer(r, 0)
    assert admitted(s.release(running.id, 1)) == [high[0]]
    assert admitted(s.release(high[0].id, 2)) == [high[1]]
    assert admitted(s.release(high[1].id, 3)) == [low]


def test_weights_share_the_places_in_proportion():
    s = scheduler(capacity=1, shares={"gold": Share(weight=3)})
    blocker = req("x")
    s.offer(blocker, 0)
    for _ in range(40):
        s.offer(req("gold"), 0)
        s.offer(req("bronze"), 0)
    order, last = [], blocker
    for t in range(40):
        (nxt,) = admitted(s.release(last.id, t))
        order.append(nxt.tenant)
        last = nxt
    assert Counter(order) == {"gold": 30, "bronze": 10}
    assert all(Counter(order[i:i + 4])["gold"] == 3 for i in range(0, 40, 4))  # interleaved, not in bursts


def test_a_tenant_at_its_limit_waits_and_others_pass_it():
    s = scheduler(capacity=3, shares={"capped": Share(max_in_flight=1)})
    one = req("capped", "a")
    assert verdict(s, one) is Admitted
    waits = req("capped", "b")  # its limit is over every pool
    assert verdict(s, waits) is Queued
    assert verdict(s, req("free", "b")) is Admitted
    assert admitted(s.release(one.id, 1)) == [waits]  # its own release frees it, in the other pool


def test_a_tenant_with_max_queued_waiting_is_refused_at_once():
    s = scheduler(capacity=1, shares={"t": Share(max_queued=1)})
    s.offer(req("t"), 0)
    assert verdict(s, req("t")) is Queued
    out = s.offer(req("t"), 0)
    assert isinstance(out.verdict, Refused) and out.verdict.reason == "tenant_limit"
    assert verdict(s, req("other")) is Queued  # the others still wait


def test_a_full_queue_refuses_the_flooders_arrival_and_pushes_out_its_newest_for_a_quiet_one():
    s = scheduler(capacity=1, max_queued=3)
    s.offer(req("noisy"), 0)
    flood = [req("noisy") for _ in range(3)]
    assert [verdict(s, r) for r in flood] == [Queued] * 3
    out = s.offer(req("noisy"), 0)
    assert out.verdict.reason == "queue_full" and out.others == ()
    out = s.offer(quiet := req("quiet"), 0)
    assert out.verdict == Queued(quiet) and out.others == (Refused(flood[2], "displaced"),)
    assert s.queued() == 3
    out = s.offer(req("quiet"), 0)  # noisy holds 3 places (one running) to quiet's 2
    assert out.others == (Refused(flood[1], "displaced"),)
    out = s.offer(req("quiet"), 0)  # 2 to 3: the arrival's tenant holds the most now
    assert out.verdict.reason == "queue_full" and out.others == ()
    out = s.offer(req("noisy"), 0)  # noisy would hold 3 to quiet's 2: its own arrival goes
    assert out.verdict.reason == "queue_full" and out.others == ()


def test_a_higher_priority_arrival_pushes_out_the_lowest_priority():
    s = scheduler(capacity=1, max_queued=2)
    s.offer(req("a"), 0)
    low = [req("a", priority=0), req("b", priority=1)]
    for r in low:
        s.offer(r, 0)
    out = s.offer(urgent := req("a", priority=2), 0)
    assert out.verdict == Queued(urgent) and out.others == (Refused(low[0], "displaced"),)
    out = s.offer(req("c", priority=0), 0)  # the lowest itself when nothing ranks below it
    assert out.verdict.reason == "queue_full"


def test_no_queue_refuses_at_once_when_full():
    s = scheduler(capacity=1, max_queued=0)
    assert verdict(s, req("t")) is Admitted
    assert s.offer(req("t"), 0).verdict.reason == "queue_full"


def test_a_waiting_request_past_its_deadline_is_refused_and_never_admitted():
    s = scheduler(capacity=1)
    running = req("t")
    s.offer(running, 0)
    late = req("t", deadline=5)
    later = req("u", deadline=9)
    s.offer(late, 0)
    s.offer(later, 0)
    assert s.expire(4.9) == []
    assert s.expire(5) == [Refused(late, "deadline")]
    # A release after the deadline refuses what is overdue before admitting anything.
    out = s.release(running.id, 10)
    assert out == [Refused(later, "deadline")] and s.in_flight() == 0


def test_an_offer_expires_the_overdue_first_and_reports_it():
    s = scheduler(capacity=1, max_queued=1)
    s.offer(req("t"), 0)
    old = req("t", deadline=1)
    s.offer(old, 0)
    out = s.offer(new := req("u"), 2)  # the queue had room again once the overdue one left
    assert out.verdict == Queued(new) and out.others == (Refused(old, "deadline"),)


def test_releasing_a_waiting_request_takes_it_out_of_the_queue():
    s = scheduler(capacity=1)
    running, gone, stays = req("t"), req("t"), req("u")
    for r in (running, gone, stays):
        s.offer(r, 0)
    assert s.release(gone.id, 1) == []  # its client went away: no place freed
    assert s.queued() == 1
    assert admitted(s.release(running.id, 2)) == [stays]


def test_the_real_cost_replaces_the_estimate_charged_on_admission():
    def next_after_settling(cost: float | None) -> str:
        s = scheduler(capacity=1)
        blocker, a1, b1 = req("x"), req("a", cost=100), req("b", cost=10)
        for r in (blocker, a1, b1):
            s.offer(r, 0)
        assert admitted(s.release(blocker.id, 1)) == [a1]  # a tie at 0: a came first
        s.offer(req("a", cost=10), 1)
        s.offer(req("b", cost=10), 1)
        assert admitted(s.release(a1.id, 2, cost=cost)) == [b1]
        (nxt,) = admitted(s.release(b1.id, 3))
        return nxt.tenant

    assert next_after_settling(None) == "b"  # a was charged 100, b 10 so far
    assert next_after_settling(1) == "a"  # a's request cost 1 in fact: a is behind b


def test_time_spent_idle_is_no_credit():
    s = scheduler(capacity=1)
    blocker = req("x")
    s.offer(blocker, 0)
    busy = [req("busy") for _ in range(20)]
    for r in busy:
        s.offer(r, 0)
    last = blocker
    for t in range(10):  # busy is served alone for a while: nobody else wants a place
        (last,) = admitted(s.release(last.id, t))
    late = [req("late") for _ in range(10)]
    for r in late:
        s.offer(r, 10)
    order = []
    for t in range(10, 16):
        (last,) = admitted(s.release(last.id, t))
        order.append(last.tenant)
    assert order.count("late") <= 4, order  # they alternate from now on; late does not get 10 in a row


def test_an_offer_twice_or_of_no_cost_is_a_mistake():
    s = scheduler()
    r = req("t")
    s.offer(r, 0)
    with pytest.raises(ValueError, match="already offered"):
        s.offer(r, 0)
    with pytest.raises(ValueError, match="cost"):
        s.offer(req("t", cost=0), 0)
    with pytest.raises(ValueError, match="weight"):
        Share(weight=0)
    with pytest.raises(ValueError, match="capacity"):
        FlowPolicy(capacity=0, max_queued=1)


def test_a_token_estimate_is_characters_over_four_and_a_reported_count_wins():
    assert tokens_of(0) == 1 and tokens_of(400) == 100
    assert tokens_spent(400, 400, None) == 200
    assert tokens_spent(400, 400, 123) == 123


# ---- properties -----------------------------------------------------------


@dataclass
class Harness:
    """Drives a scheduler, keeps its own account of every request from the
    decisions alone, and checks the invariants after every step."""

    policy: FlowPolicy
    s: FlowScheduler = field(init=False)
    now: float = 0.0
    waiting: dict[object, FlowRequest] = field(default_factory=dict)
    running: dict[object, FlowRequest] = field(default_factory=dict)
    fate: dict[object, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.s = FlowScheduler(self.policy)

    def offer(self, r: FlowRequest) -> None:
        out = self.s.offer(r, self.now)
        self.fate[r.id] = "offered"
        if isinstance(out.verdict, Queued):
            self.waiting[r.id] = r
        self.apply([*out.others, *([out.verdict] if not isinstance(out.verdict, Queued) else [])],
                   from_queue=False)
        self.check()

    def release(self, request_id: object, cost: float | None = None) -> None:
        was_waiting = self.waiting.pop(request_id, None)
        if was_waiting is not None:
            self.fate[request_id] = "withdrawn"
        elif self.running.pop(request_id, None) is not None:
            self.fate[request_id] = "released"
        self.apply(self.s.release(request_id, self.now, cost))
        self.check()

    def expire(self) -> None:
        self.apply(self.s.expire(self.now))
        self.check()

    def apply(self, decisions, from_queue: bool = True) -> None:
        for d in decisions:
            r = d.request
            if isinstance(d, Admitted):
                assert self.fate[r.id] == "offered" and r.id not in self.running
                if from_queue:
                    self.check_priority(r)
                self.waiting.pop(r.id, None)
                self.running[r.id] = r
                self.fate[r.id] = "admitted"
            else:
                assert isinstance(d, Refused) and r.id not in self.running
                if d.reason == "deadline":
                    assert r.deadline <= self.now
                self.waiting.pop(r.id, None)
                self.fate[r.id] = d.reason

    def tenant_running(self, tenant: str) -> int:
        return sum(1 for r in self.running.values() if r.tenant == tenant)

    def eligible(self, tenant: str) -> bool:
        limit = self.policy.share_of(tenant).max_in_flight
        return limit is None or self.tenant_running(tenant) < limit

    def check_priority(self, chosen: FlowRequest) -> None:
        """No request left waiting in its pool outranks it and could have run."""
        for w in self.waiting.values():
            if w.id != chosen.id and w.pool == chosen.pool and w.priority > chosen.priority:
                assert not self.eligible(w.tenant) and w.tenant != chosen.tenant, (w, chosen)

    def check(self) -> None:
        pools = {r.pool for r in [*self.waiting.values(), *self.running.values()]}
        for pool in pools:
            in_pool = [r for r in self.running.values() if r.pool == pool]
            queued = [r for r in self.waiting.values() if r.pool == pool]
            assert len(in_pool) <= self.policy.capacity_of(pool)
            assert len(queued) <= self.policy.max_queued
            if len(in_pool) < self.policy.capacity_of(pool):  # a free place: nothing waiting could take it
                assert all(not self.eligible(r.tenant) for r in queued), (pool, queued)
        for tenant in {r.tenant for r in self.running.values()}:
            limit = self.policy.share_of(tenant).max_in_flight
            assert limit is None or self.tenant_running(tenant) <= limit
        for tenant in {r.tenant for r in self.waiting.values()}:
            limit = self.policy.share_of(tenant).max_queued
            assert limit is None or sum(r.tenant == tenant for r in self.waiting.values()) <= limit
        assert all(r.deadline > self.now for r in self.waiting.values())
        assert (self.s.queued(), self.s.in_flight()) == (len(self.waiting), len(self.running))


TENANTS = ["a", "b", "c", "d"]
policies = st.builds(
    lambda capacity, max_queued, big, shares: FlowPolicy(capacity=capacity, max_queued=max_queued,
                                                         capacities={"big": big}, shares=shares),
    st.integers(1, 3), st.integers(0, 6), st.integers(1, 5),
    st.dictionaries(st.sampled_from(TENANTS), st.builds(
        Share, weight=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
        max_in_flight=st.none() | st.integers(1, 3), max_queued=st.none() | st.integers(0, 3))))
offers = st.tuples(st.just("offer"), st.sampled_from(TENANTS), st.sampled_from(["m", "big"]), st.integers(0, 2),
                   st.floats(0.5, 50), st.none() | st.floats(0.5, 20))
steps = st.lists(offers | st.tuples(st.just("release"), st.integers(0, 10**6), st.none() | st.floats(0.5, 50))
                 | st.tuples(st.just("withdraw"), st.integers(0, 10**6))
                 | st.tuples(st.just("wait"), st.floats(0, 5)), min_size=10, max_size=80)


@settings(max_examples=300, deadline=None)
@given(policy=policies, script=steps)
def test_no_request_starves_and_every_bound_holds_after_every_step(policy, script):
    h = Harness(policy)
    for step in script:
        if step[0] == "offer":
            _, tenant, pool, priority, cost, wait = step
            h.offer(FlowRequest(next(ids), tenant, pool, priority, cost, INF if wait is None else h.now + wait))
        elif step[0] == "release" and h.running:
            keys = sorted(h.running, key=str)
            h.release(keys[step[1] % len(keys)], step[2])
        elif step[0] == "withdraw" and h.waiting:
            keys = sorted(h.waiting, key=str)
            h.release(keys[step[1] % len(keys)])
        elif step[0] == "wait":
            h.now += step[1]
            h.expire()
    # Releasing whatever runs, again and again, admits everything still
    # waiting (requests without a deadline included): no one is left behind.
    while h.running:
        h.release(next(iter(h.running)))
    assert not h.waiting
    assert all(f in ("released", "withdrawn", "queue_full", "displaced", "deadline", "tenant_limit")
               for f in h.fate.values()), Counter(h.fate.values())
    assert (h.s.queued(), h.s.in_flight()) == (0, 0)


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0]), min_size=2, max_size=5),
       costs=st.lists(st.lists(st.floats(0.5, 20), min_size=1, max_size=4), min_size=5, max_size=5),
       capacity=st.integers(1, 4), picks=st.lists(st.integers(0, 3), min_size=60, max_size=60))
def test_competing_tenants_shares_stay_within_one_admission_of_their_weights(weights, costs, capacity, picks):
    tenants = [f"t{i}" for i in range(len(weights))]
    policy = FlowPolicy(capacity=capacity, max_queued=10_000,
                        shares={t: Share(weight=w) for t, w in zip(tenants, weights, strict=True)})
    s = FlowScheduler(policy)
    running = [req("warm") for _ in range(capacity)]  # the places are taken before anyone competes
    for r in running:
        assert isinstance(s.offer(r, 0).verdict, Admitted)
    n = 80
    for t, cost_cycle in zip(tenants, costs, strict=False):
        for i in range(n):
            s.offer(req(t, cost=cost_cycle[i % len(cost_cycle)]), 0)
    delta = max(max(c) / w for c, w in zip(costs, weights, strict=False))  # one admission, the largest
    served = Counter()
    admissions = Counter()
    for step, pick in enumerate(picks):
        done = running.pop(pick % len(running))  # any of those running ends
        for new in admitted(s.release(done.id, step)):
            running.append(new)
            served[new.tenant] += new.cost
            admissions[new.tenant] += 1
        if any(admissions[t] >= n for t in tenants):
            break  # a tenant ran out of requests: it no longer competes
        norm = [served[t] / policy.share_of(t).weight for t in tenants]
        assert max(norm) - min(norm) <= delta + 1e-9, (norm, delta)


def simulate(rates: dict[str, int], ticks: int, capacity: int, weights: dict[str, float] | None = None,
             every: dict[str, int] | None = None) -> tuple[Counter, dict[str, list[int]]]:
    """Each tick every tenant offers ``rates[t]`` requests (every ``every[t]``
    ticks), each running request takes one tick, a request waits 5 ticks at
    most: admissions by tenant, and how long each admitted request waited."""
    s = FlowScheduler(FlowPolicy(capacity=capacity, max_queued=200,
                                 shares={t: Share(weight=w) for t, w in (weights or {}).items()}))
    arrived: dict[object, int] = {}
    waits: dict[str, list[int]] = {t: [] for t in rates}
    served = Counter()
    running: list[FlowRequest] = []

    def admit(rs, tick):
        for r in rs:
            running.append(r)
            served[r.tenant] += 1
            waits[r.tenant].append(tick - arrived[r.id])

    for tick in range(ticks):
        for t, rate in rates.items():
            if tick % (every or {}).get(t, 1) == 0:
                for _ in range(rate):
                    r = req(t, deadline=tick + 5)
                    arrived[r.id] = tick
                    out = s.offer(r, tick)
                    admit([out.verdict.request] if isinstance(out.verdict, Admitted) else [], tick)
        ending, running[:] = list(running), []
        for r in ending:
            admit(admitted(s.release(r.id, tick + 0.5)), tick)
    return served, waits


def test_a_noisy_tenant_at_ten_times_the_rate_of_five_quiet_ones_gets_its_share_not_ten_times():
    rates = {"noisy": 10, **{f"quiet{i}": 1 for i in range(5)}}
    served, _ = simulate(rates, ticks=300, capacity=4)
    total = sum(served.values())
    assert total >= 4 * 299  # work-conserving: every place used every tick
    for tenant in rates:  # all six want more than 4/6 a tick: each gets a sixth, noisy included
        assert abs(served[tenant] / total - 1 / 6) < 0.01, served
    served, _ = simulate(rates, ticks=300, capacity=4, weights={"noisy": 2})
    total = sum(served.values())
    assert abs(served["noisy"] / total - 2 / 7) < 0.01, served


def test_quiet_tenants_under_their_share_get_everything_at_once_and_the_noisy_one_the_rest():
    rates = {"noisy": 10, **{f"quiet{i}": 1 for i in range(5)}}
    every = {f"quiet{i}": 4 for i in range(5)}  # a quarter of a request a tick each: under a sixth of 4
    served, waits = simulate(rates, ticks=400, capacity=4, every=every)
    for i in range(5):
        assert served[f"quiet{i}"] == 100 and max(waits[f"quiet{i}"]) <= 1, waits[f"quiet{i}"]
    assert served["noisy"] >= 4 * 399 - 500  # work-conserving: the noisy one takes every other place
