"""Flow control's asyncio shell (coordinator/driver/flow_gate.py): a waiting
request wakes when the scheduler decides for it, whoever's call decided;
cancelled or abandoned, it leaves the queue or gives its place to the next;
refusals and queues are reported."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import get_args

import pytest

from coordinator.core.config import FlowSettings
from coordinator.core.flow import FlowPolicy, FlowRequest, Reason
from coordinator.driver.flow_gate import ClientGone, FlowGate, FlowRefused, refusal_message
from tests.conftest import poll

pytestmark = pytest.mark.anyio

FAR = float("inf")


class Recorded:
    def __init__(self) -> None:
        self.queued: dict[str, int] = {}
        self.refused: Counter[tuple[str, str]] = Counter()

    def flow_queued(self, tenant: str, count: int) -> None:
        self.queued[tenant] = count

    def flow_refused(self, tenant: str, reason: str) -> None:
        self.refused[tenant, reason] += 1


async def test_a_release_wakes_the_next_waiting_request():
    gate = FlowGate(FlowPolicy(capacity=1, max_queued=4))
    first = gate.ticket("a", "m", 0, 1, FAR)
    await gate.enter(first)
    second = gate.ticket("b", "m", 0, 1, FAR)
    waiting = asyncio.create_task(gate.enter(second))
    await poll(lambda: gate.queued() == 1)
    gate.leave(first)
    await asyncio.wait_for(waiting, 5)
    assert (gate.queued(), gate.in_flight()) == (0, 1)


async def test_a_cancelled_waiting_request_leaves_the_queue():
    gate = FlowGate(FlowPolicy(capacity=1, max_queued=4))
    await gate.enter(gate.ticket("a", "m", 0, 1, FAR))
    waiting = asyncio.create_task(gate.enter(gate.ticket("b", "m", 0, 1, FAR)))
    await poll(lambda: gate.queued() == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (gate.queued(), gate.in_flight()) == (0, 1)


async def test_a_client_gone_as_its_request_is_admitted_gives_the_place_to_the_next():
    gate = FlowGate(FlowPolicy(capacity=1, max_queued=4))
    first = gate.ticket("a", "m", 0, 1, FAR)
    await gate.enter(first)
    left = asyncio.Event()
    abandoned = asyncio.create_task(gate.enter(gate.ticket("b", "m", 0, 1, FAR), gone=left.wait))
    await poll(lambda: gate.queued() == 1)
    patient = asyncio.create_task(gate.enter(gate.ticket("c", "m", 0, 1, FAR)))
    await poll(lambda: gate.queued() == 2)
    left.set()
    gate.leave(first)  # admits the abandoned one, in the same turn as its client leaves
    with pytest.raises(ClientGone):
        await abandoned
    await asyncio.wait_for(patient, 5)
    assert (gate.queued(), gate.in_flight()) == (0, 1)


async def test_refusals_and_queues_are_reported_by_tenant():
    metrics = Recorded()
    gate = FlowGate(FlowPolicy(capacity=1, max_queued=1), metrics)
    await gate.enter(gate.ticket("a", "m", 0, 1, FAR))
    waiting = asyncio.create_task(gate.enter(gate.ticket("a", "m", 0, 1, time.monotonic() + 0.1)))
    await poll(lambda: metrics.queued.get("a") == 1)
    with pytest.raises(FlowRefused) as full:
        await gate.enter(gate.ticket("a", "m", 0, 1, FAR))
    assert full.value.reason == "queue_full" and full.value.waited == 0
    with pytest.raises(FlowRefused) as late:
        await waiting
    assert late.value.reason == "deadline" and late.value.waited >= 0.09
    assert metrics.refused == {("a", "queue_full"): 1, ("a", "deadline"): 1}
    assert metrics.queued == {"a": 0}


# ---- one gate for many loops and threads (a process's RayWorkerManager callers) ----

class Demand:
    """Records what the gate reports as demand per model@type (thread-safe enough: under the gate's lock)."""

    def __init__(self) -> None:
        self.waiting: Counter[str] = Counter()
        self.most: Counter[str] = Counter()

    def __call__(self, key: str, change: int) -> None:
        self.waiting[key] += change
        self.most[key] = max(self.most[key], self.waiting[key])


async def test_a_release_on_one_loop_wakes_a_request_waiting_on_another_threads_loop():
    import threading

    demand = Demand()
    gate = FlowGate(FlowPolicy(capacity=1, max_queued=4), demand=demand)
    first = gate.ticket("a", "m", 0, 1, FAR)
    await gate.enter(first, key="m@llm")
    admitted = threading.Event()

    def other_thread() -> None:
        async def wait_then_leave() -> None:
            ticket = gate.ticket("b", "m", 0, 1, FAR)
            await gate.enter(ticket, key="m@llm")
            admitted.set()
            gate.leave(ticket)

        asyncio.run(wait_then_leave())

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        await poll(lambda: gate.queued() == 1)
        assert demand.waiting == {"m@llm": 1}  # waiting: demand for its model
        assert not admitted.is_set()
        gate.leave(first)  # this loop frees the place; the other thread's loop wakes
        await poll(admitted.is_set, timeout=5)
    finally:
        thread.join(5)
    assert not thread.is_alive()
    assert (gate.queued(), gate.in_flight()) == (0, 0)
    assert demand.waiting["m@llm"] == 0 and demand.most["m@llm"] == 1


def test_callers_on_many_threads_never_exceed_the_capacity_and_all_finish():
    import threading

    capacity, threads, each = 3, 8, 25
    demand = Demand()
    gate = FlowGate(FlowPolicy(capacity=capacity, max_queued=1000), demand=demand)
    lock = threading.Lock()
    running = Counter()
    seen = {"most": 0, "done": 0}

    def caller(n: int) -> None:
        async def calls() -> None:
            for _ in range(each):
                ticket = gate.ticket(f"t{n % 3}", "m", 0, 1, time.monotonic() + 30)
                await gate.enter(ticket, key="m@llm")
                with lock:
                    running["m"] += 1
                    seen["most"] = max(seen["most"], running["m"])
                await asyncio.sleep(0.001)
                with lock:
                    running["m"] -= 1
                    seen["done"] += 1
                gate.leave(ticket)

        asyncio.run(calls())

    pool = [threading.Thread(target=caller, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not any(t.is_alive() for t in pool)
    assert seen["done"] == threads * each
    assert 1 <= seen["most"] <= capacity
    assert demand.most["m@llm"] >= 1  # some waited, and were counted as demand
    assert demand.waiting["m@llm"] == 0 and (gate.queued(), gate.in_flight()) == (0, 0)


async def test_a_refused_or_cancelled_waiting_request_is_no_longer_demand():
    demand = Demand()
    gate = FlowGate(FlowPolicy(capacity=1, max_queued=1), demand=demand)
    await gate.enter(gate.ticket("a", "m", 0, 1, FAR), key="m@llm")
    late = asyncio.create_task(gate.enter(gate.ticket("a", "m", 0, 1, time.monotonic() + 0.1), key="m@llm"))
    await poll(lambda: demand.waiting["m@llm"] == 1)
    with pytest.raises(FlowRefused):
        await late
    assert demand.waiting["m@llm"] == 0
    cancelled = asyncio.create_task(gate.enter(gate.ticket("b", "m", 0, 1, FAR), key="m@llm"))
    await poll(lambda: demand.waiting["m@llm"] == 1)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert demand.waiting["m@llm"] == 0 and gate.queued() == 0


# ---- why a request was refused, in the gateway's and a caller's words ----

GATEWAY = {"section": "gateway.flow", "who": "this key's tenant", "retry": "try again shortly"}
CALLER = {"section": "caller.flow", "who": "tenant 'batch'", "where": " in this process", "retry": "try again in 2 s"}


@pytest.mark.parametrize("reason, waited, wording, sentence", [
    ("deadline", 29.96, GATEWAY,
     "m: no place freed within 30.0 s of waiting (gateway.flow.max_wait 30 s); try again shortly"),
    ("tenant_limit", 0, GATEWAY,
     "this key's tenant already has 5 requests waiting, its limit (the max_queued of 'batch' in "
     "gateway.flow.tenants); try again shortly"),
    ("displaced", 0.4, GATEWAY,
     "m: the queue is full (gateway.flow.max_queued 8) and this request gave its place to one of a higher "
     "priority or of a tenant with less of the queue; try again shortly"),
    ("queue_full", 0, GATEWAY,
     "m: 8 requests already wait for it (gateway.flow.max_queued) and none ranks after this one; try again shortly"),
    ("deadline", 29.96, CALLER,
     "m: no place freed within 30.0 s of waiting (caller.flow.max_wait 30 s); try again in 2 s"),
    ("tenant_limit", 0, CALLER,
     "tenant 'batch' already has 5 requests waiting in this process, its limit (the max_queued of 'batch' in "
     "caller.flow.tenants); try again in 2 s"),
    ("displaced", 0.4, CALLER,
     "m: the queue is full (caller.flow.max_queued 8) and this request gave its place to one of a higher "
     "priority or of a tenant with less of the queue; try again in 2 s"),
    ("queue_full", 0, CALLER,
     "m: 8 requests already wait for it in this process (caller.flow.max_queued) and none ranks after this one; "
     "try again in 2 s"),
])
def test_a_refusal_says_why_in_the_words_of_its_caller(reason, waited, wording, sentence):
    flow = FlowSettings(capacity=2, max_queued=8, max_wait=30, retry_after=2,
                        tenants=[{"name": "batch", "max_queued": 5}])
    refused = FlowRefused(FlowRequest(1, "batch", "m", 0, 1.0, FAR), reason, waited)
    assert refusal_message(refused, flow, **wording) == sentence


def test_a_tenant_not_listed_is_pointed_at_the_default_share():
    flow = FlowSettings(capacity=2, default={"max_queued": 3})
    refused = FlowRefused(FlowRequest(1, "someone", "m", 0, 1.0, FAR), "tenant_limit", 0)
    assert refusal_message(refused, flow, **GATEWAY) == (
        "this key's tenant already has 3 requests waiting, its limit (gateway.flow.default.max_queued); "
        "try again shortly")


def test_every_reason_of_refusal_has_its_own_sentence():
    flow = FlowSettings(capacity=1)
    sentences = {refusal_message(FlowRefused(FlowRequest(1, "a", "m", 0, 1.0, FAR), reason, 0), flow, **GATEWAY)
                 for reason in get_args(Reason)}
    assert len(sentences) == len(get_args(Reason))  # a new reason needs a sentence of its own
