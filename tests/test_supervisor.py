"""The supervisor of background loops, without Ray: a failing loop is restarted
with a capped pause and counted, the others never notice, and a loop that
cannot be kept running is handed to ``on_fatal`` (the actor then exits so Ray
restarts it)."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.core.supervisor import Supervisor, pause

pytestmark = pytest.mark.anyio


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


async def test_a_failing_loop_is_restarted_and_counted_while_the_others_run_on():
    restarts: list[str] = []
    sup = Supervisor(on_restart=restarts.append, sleep=no_sleep)
    ticks = {"steady": 0, "flaky": 0}

    async def steady() -> None:
        while True:
            ticks["steady"] += 1
            await asyncio.sleep(0.001)

    async def flaky() -> None:
        ticks["flaky"] += 1
        if ticks["flaky"] <= 3:
            raise RuntimeError(f"boom {ticks['flaky']}")
        await asyncio.Event().wait()

    sup.add("steady", steady)
    sup.add("flaky", flaky)
    task = asyncio.create_task(sup.run())
    for _ in range(500):
        if ticks["flaky"] >= 4 and ticks["steady"] > 10:
            break
        await asyncio.sleep(0.002)
    states = {s.name: s for s in sup.states()}
    assert restarts == ["flaky"] * 3
    assert states["flaky"].state == "running" and states["flaky"].restarts == 3
    assert states["flaky"].last_error == "RuntimeError: boom 3"
    assert states["steady"].restarts == 0 and ticks["steady"] > 10
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_loop_that_keeps_failing_is_given_up_on_and_reported_fatal():
    fatal: list[tuple[str, str]] = []
    sup = Supervisor(on_fatal=lambda name, exc: fatal.append((name, str(exc))), sleep=no_sleep, give_up_after=5)

    async def broken() -> None:
        raise ValueError("always")

    sup.add("broken", broken)
    await asyncio.wait_for(sup.run(), 5)  # returns: the only loop was given up on
    assert fatal == [("broken", "always")]
    assert sup.states()[0].state == "failed" and sup.states()[0].restarts == 5


async def test_a_loop_that_returns_is_started_again():
    runs = []
    sup = Supervisor(sleep=no_sleep, give_up_after=1000)

    async def short() -> None:
        runs.append(1)
        if len(runs) >= 3:
            await asyncio.Event().wait()

    sup.add("short", short)
    task = asyncio.create_task(sup.run())
    for _ in range(200):
        if len(runs) >= 3:
            break
        await asyncio.sleep(0.002)
    assert len(runs) == 3 and sup.states()[0].last_error == "RuntimeError: the loop returned"
    task.cancel()


def test_the_pause_doubles_up_to_its_cap_for_any_number_of_failures():
    assert [pause(n, 0.1, 30.0) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert pause(10_000, 0.1, 30.0) == 30.0
