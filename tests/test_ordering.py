"""Per-key serialisation: one at a time per model, in arrival order; models in parallel."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.ordering import KeyedSerializer

pytestmark = pytest.mark.anyio


async def test_same_key_runs_one_at_a_time_in_arrival_order():
    serial = KeyedSerializer()
    log: list[str] = []
    running = 0

    async def op(i: int) -> None:
        nonlocal running
        async with serial.hold("m@llm"):
            running += 1
            assert running == 1
            log.append(f"start {i}")
            await asyncio.sleep(0.01 * (5 - i))  # later arrivals are quicker
            log.append(f"end {i}")
            running -= 1

    async with asyncio.TaskGroup() as tg:
        for i in range(5):
            tg.create_task(op(i))
            await asyncio.sleep(0)  # arrive in this order
    assert log == [x for i in range(5) for x in (f"start {i}", f"end {i}")]


async def test_different_keys_run_concurrently():
    serial = KeyedSerializer()
    both_inside = asyncio.Event()
    inside = 0

    async def op(key: str) -> None:
        nonlocal inside
        async with serial.hold(key):
            inside += 1
            if inside == 2:
                both_inside.set()
            await asyncio.wait_for(both_inside.wait(), 5)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(op("a@llm"))
        tg.create_task(op("b@llm"))


async def test_locks_are_dropped_when_idle_even_after_cancellation():
    serial = KeyedSerializer()
    gate = asyncio.Event()

    async def holder() -> None:
        async with serial.hold("m"):
            await gate.wait()

    async def waiter() -> None:
        async with serial.hold("m"):
            pass

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    w = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    assert serial.busy_keys() == ["m"]
    w.cancel()
    gate.set()
    await h
    with pytest.raises(asyncio.CancelledError):
        await w
    assert serial.busy_keys() == []
