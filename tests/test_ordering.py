"""Per-key order: one at a time per model, in arrival order; models in parallel;
identical waiting operations merged; the queue bounded; an operation outlives
a caller that stops waiting."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.core.ordering import OperationQueue, QueueFull

pytestmark = pytest.mark.anyio


async def test_same_key_runs_one_at_a_time_in_arrival_order():
    queue = OperationQueue()
    log: list[str] = []
    running = 0

    async def op(i: int) -> int:
        nonlocal running
        running += 1
        assert running == 1
        log.append(f"start {i}")
        await asyncio.sleep(0.01 * (5 - i))  # later arrivals are quicker
        log.append(f"end {i}")
        running -= 1
        return i

    async with asyncio.TaskGroup() as tg:
        tasks = []
        for i in range(5):
            tasks.append(tg.create_task(queue.run("m@llm", lambda i=i: op(i), same_as=i)))
            await asyncio.sleep(0)  # arrive in this order
    assert log == [x for i in range(5) for x in (f"start {i}", f"end {i}")]
    assert [t.result() for t in tasks] == list(range(5))


async def test_different_keys_run_concurrently():
    queue = OperationQueue()
    both_inside = asyncio.Event()
    inside = 0

    async def op() -> None:
        nonlocal inside
        inside += 1
        if inside == 2:
            both_inside.set()
        await asyncio.wait_for(both_inside.wait(), 5)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(queue.run("a@llm", op))
        tg.create_task(queue.run("b@llm", op))


async def test_identical_waiting_operations_are_carried_out_once():
    """Sixty identical restarts while one runs: one more is carried out, and
    every caller gets its result."""
    queue = OperationQueue()
    gate = asyncio.Event()
    runs: list[str] = []

    async def op(name: str) -> str:
        runs.append(name)
        if name == "first":
            await gate.wait()
        return f"{name} done"

    first = asyncio.ensure_future(queue.run("m", lambda: op("first"), same_as="restart"))
    await asyncio.sleep(0)  # running: no longer waiting, so not joined
    callers = [asyncio.ensure_future(queue.run("m", lambda: op("again"), same_as="restart")) for _ in range(60)]
    await asyncio.sleep(0)
    assert queue.depths() == {"m": 1}
    gate.set()
    assert await first == "first done"
    assert {await c for c in callers} == {"again done"}
    assert runs == ["first", "again"]


async def test_distinct_operations_past_the_limit_are_refused_at_once():
    queue = OperationQueue(limit=2)
    gate = asyncio.Event()

    async def op() -> None:
        await gate.wait()

    running = asyncio.ensure_future(queue.run("m", op, same_as=0))
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(queue.run("m", op, same_as=i)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as refused:
        await queue.run("m", op, same_as=3)
    assert (refused.value.key, refused.value.depth) == ("m", 2)
    gate.set()
    await asyncio.gather(running, *waiting)


async def test_an_operation_outlives_a_caller_that_stops_waiting_and_the_line_is_dropped_when_idle():
    queue = OperationQueue()
    gate = asyncio.Event()
    finished: list[str] = []

    async def op(name: str) -> None:
        await gate.wait()
        finished.append(name)

    caller = asyncio.ensure_future(queue.run("m", lambda: op("first")))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(queue.run("m", lambda: op("second")))
    await asyncio.sleep(0)
    caller.cancel()  # the caller walks away; its operation does not
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert queue.busy_keys() == ["m"]
    gate.set()
    await second
    assert finished == ["first", "second"]
    assert queue.busy_keys() == [] and queue.depths() == {}


async def test_a_failing_operation_fails_its_callers_only():
    queue = OperationQueue()

    async def boom() -> None:
        raise RuntimeError("worker said no")

    async def fine() -> str:
        return "ok"

    failing = asyncio.ensure_future(queue.run("m", boom))
    after = asyncio.ensure_future(queue.run("m", fine))
    with pytest.raises(RuntimeError, match="worker said no"):
        await failing
    assert await after == "ok"
