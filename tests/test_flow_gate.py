"""Flow control's asyncio shell (coordinator/driver/flow_gate.py): a waiting
request wakes when the scheduler decides for it, whoever's call decided;
cancelled or abandoned, it leaves the queue or gives its place to the next;
refusals and queues are reported."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from coordinator.core.flow import FlowPolicy
from coordinator.driver.flow_gate import ClientGone, FlowGate, FlowRefused
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
