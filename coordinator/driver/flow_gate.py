"""Flow control's shell: a request waits on an asyncio future until the pure
scheduler (:mod:`coordinator.core.flow`) admits it, refuses it, or its
client goes away.

:class:`FlowGate` owns the scheduler and the futures of the waiting
requests, and is the one place that applies the scheduler's decisions
(:meth:`FlowGate._apply`): an admission or a refusal wakes the request it
concerns, whichever caller's offer, release or deadline caused it. It keeps
no timer: each waiting request wakes at its own deadline and asks the
scheduler to refuse what is overdue. One per event loop (a gateway replica),
not thread-safe.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from coordinator.core.flow import Admitted, Decision, FlowPolicy, FlowRequest, FlowScheduler, Reason, Refused


class FlowRefused(Exception):
    """The request will not run: ``reason`` is one of
    :data:`coordinator.core.flow.Reason`; ``waited`` is the seconds it waited."""

    def __init__(self, request: FlowRequest, reason: Reason, waited: float) -> None:
        super().__init__(f"{request.pool}: refused ({reason}) after {waited:.3f} s")
        self.request, self.reason, self.waited = request, reason, waited


class ClientGone(Exception):
    """The client went away while its request waited: it left the queue."""


class FlowMetrics(Protocol):
    def flow_queued(self, tenant: str, count: int) -> None: ...

    def flow_refused(self, tenant: str, reason: str) -> None: ...


class FlowGate:
    def __init__(self, policy: FlowPolicy, metrics: FlowMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._scheduler = FlowScheduler(policy)
        self._metrics = metrics
        self._clock = clock
        self._ids = itertools.count()
        self._admissions: dict[int, asyncio.Future[Admitted | Refused]] = {}

    def ticket(self, tenant: str, pool: str, priority: int, cost: float, deadline: float) -> FlowRequest:
        """A request to offer, with an id of its own (``deadline`` on this gate's clock)."""
        return FlowRequest(next(self._ids), tenant, pool, priority, cost, deadline)

    async def enter(self, request: FlowRequest, gone: Callable[[], Awaitable[object]] | None = None) -> None:
        """Return once ``request`` is admitted; it then holds its place until
        :meth:`leave`. Raises :class:`FlowRefused` (no room to wait, its
        tenant's limit, pushed out, or past its deadline) or
        :class:`ClientGone` (``gone()`` returned while it waited). Cancelled,
        it leaves the queue — or gives back a place it was just given."""
        entered = self._clock()
        offer = self._scheduler.offer(request, entered)
        self._apply([*offer.others, offer.verdict], request.tenant)
        if isinstance(offer.verdict, Refused):
            raise FlowRefused(request, offer.verdict.reason, 0.0)
        if isinstance(offer.verdict, Admitted):
            return
        decision = await self._wait(request, gone)
        if isinstance(decision, Refused):
            raise FlowRefused(request, decision.reason, self._clock() - entered)

    def leave(self, request: FlowRequest, cost: float | None = None) -> None:
        """``request`` is done (it may have run or not; twice is harmless):
        its place goes to the next, its tenant charged ``cost`` if given."""
        self._apply(self._scheduler.release(request.id, self._clock(), cost), request.tenant)

    def queued(self) -> int:
        return self._scheduler.queued()

    def in_flight(self) -> int:
        return self._scheduler.in_flight()

    async def _wait(self, request: FlowRequest, gone: Callable[[], Awaitable[object]] | None) -> Admitted | Refused:
        admission: asyncio.Future[Admitted | Refused] = asyncio.get_running_loop().create_future()
        self._admissions[request.id] = admission
        watcher = asyncio.ensure_future(gone()) if gone is not None else None
        decided = False
        try:
            while not admission.done():
                left = request.deadline - self._clock()
                if left <= 0:
                    # Its own deadline: refuse what is overdue (this one included).
                    self._apply(self._scheduler.expire(self._clock()), request.tenant)
                    assert admission.done(), f"{request} outlived its deadline"
                    break
                await asyncio.wait([admission, *([watcher] if watcher else [])], timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)
                if watcher is not None and watcher.done():  # gone, even if admitted just now
                    raise ClientGone()
            decided = True
            return admission.result()
        finally:
            del self._admissions[request.id]
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            if not decided:
                self.leave(request)

    def _apply(self, decisions: Iterable[Decision], tenant: str) -> None:
        """Wake the waiting requests ``decisions`` concern, count the
        refusals, and report the queues of every tenant they touched."""
        touched = {tenant}
        for decision in decisions:
            request = decision.request
            touched.add(request.tenant)
            if isinstance(decision, Refused) and self._metrics is not None:
                self._metrics.flow_refused(request.tenant, decision.reason)
            if isinstance(decision, Admitted | Refused):
                admission = self._admissions.get(request.id)
                if admission is not None and not admission.done():
                    admission.set_result(decision)
        if self._metrics is not None:
            for name in touched:
                self._metrics.flow_queued(name, self._scheduler.queued(name))
