"""Supervision of an actor's background loops.

A loop is a coroutine that should run for the actor's whole life (following a
watcher, resyncing, keeping deployments, expiring entries, ...). Run under a
:class:`Supervisor`, a loop that raises is logged with its traceback, counted
(``on_restart(loop)``, the ``coordinator_loop_restarts_total`` counter), and
started again after a capped, doubling pause; one that returns is started
again too (a loop has no business ending). A loop that keeps failing without
ever running for ``stable_after`` seconds in between — ``give_up_after``
failures in a row — cannot be restarted in place: the supervisor calls
``on_fatal``, which ends the process so that Ray restarts the actor cleanly
(Ray Serve's controller does the same: its control loop survives a pass's
failure, and a dead controller is Ray's to restart).

Cancellation is not a failure: cancelling :meth:`Supervisor.run` cancels every
loop and returns.

No Ray and no I/O here: the clock, the sleep and both callbacks are injected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

log = logging.getLogger(__name__)

#: The longest pause before a failed loop is started again.
MAX_PAUSE = 30.0


class LoopState(BaseModel):
    """One supervised loop, as ``status()`` shows it."""

    name: str
    state: Literal["running", "restarting", "failed"]
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None  # unix time


@dataclass
class _Loop:
    name: str
    factory: Callable[[], Awaitable[None]]
    state: LoopState


class Supervisor:
    def __init__(
        self,
        on_restart: Callable[[str], None] = lambda name: None,
        on_fatal: Callable[[str, BaseException], None] | None = None,
        first_pause: float = 0.1,
        max_pause: float = MAX_PAUSE,
        give_up_after: int = 20,
        stable_after: float = 60.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._loops: dict[str, _Loop] = {}
        self._on_restart = on_restart
        self._on_fatal = on_fatal
        self._first_pause, self._max_pause = first_pause, max_pause
        self._give_up_after, self._stable_after = give_up_after, stable_after
        self._clock, self._sleep = clock, sleep

    def add(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        """Supervise ``factory()`` (called again for each restart) as ``name``."""
        if name in self._loops:
            raise ValueError(f"a loop named {name!r} is supervised already")
        self._loops[name] = _Loop(name, factory, LoopState(name=name, state="running"))

    def states(self) -> list[LoopState]:
        return [loop.state.model_copy() for loop in self._loops.values()]

    async def run(self) -> None:
        """Run every loop until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for loop in self._loops.values():
                tg.create_task(self._keep(loop), name=loop.name)

    async def _keep(self, loop: _Loop) -> None:
        failures = 0  # in a row, without a stable run between them
        while True:
            started = self._clock()
            loop.state.state = "running"
            try:
                await loop.factory()
                error: BaseException = RuntimeError("the loop returned")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — this is the one place that catches all
                error = exc
            if self._clock() - started >= self._stable_after:
                failures = 0
            failures += 1
            loop.state.restarts += 1
            loop.state.last_error = f"{type(error).__name__}: {error}"
            loop.state.last_error_at = self._clock()
            log.error("loop %r failed (%d in a row); restarting it", loop.name, failures, exc_info=error)
            self._on_restart(loop.name)
            if failures >= self._give_up_after:
                loop.state.state = "failed"
                log.critical("loop %r failed %d times in a row; giving up on it", loop.name, failures)
                if self._on_fatal is not None:
                    self._on_fatal(loop.name, error)
                return
            loop.state.state = "restarting"
            await self._sleep(pause(failures, self._first_pause, self._max_pause))


def pause(failures: int, first: float, maximum: float) -> float:
    """``first`` doubling with each failure in a row, at most ``maximum``; the
    exponent is capped, so any count of failures is fine."""
    return min(maximum, first * 2 ** min(max(0, failures - 1), 60))
