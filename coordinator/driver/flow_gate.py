"""Flow control's shell: a request waits on an asyncio future until the pure
scheduler (:mod:`coordinator.core.flow`) admits it, refuses it, or its
client goes away.

:class:`FlowGate` owns the scheduler and the futures of the waiting
requests, and is the one place that applies the scheduler's decisions
(:meth:`FlowGate._decide`): an admission or a refusal wakes the request it
concerns, whichever caller's offer, release or deadline caused it. It keeps
no timer: each waiting request wakes at its own deadline and asks the
scheduler to refuse what is overdue.

One gate may serve callers on many event loops and threads (a process's
``RayWorkerManager`` callers: ``sync_*`` methods run on a manager's private
loop, async ones on their caller's): a lock guards the scheduler and the
waiting requests, a decision is written under it, and a request waiting on
another loop is woken with ``call_soon_threadsafe``. The waiting request
reads its decision, not its future's result, so a wake-up still on its way
when its deadline passes is no lost admission.

Requests waiting here are demand: with ``demand``, the gate counts each
waiting request for the model@type its caller names (``key``), so the
router's load reports show them as ``queued`` and the autoscaler adds them
to the model's load.

:func:`refusal_message` says why a request was refused, in the same words
for the gateway's 429 and a caller's ``OverloadedError``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from coordinator.core.config import FlowSettings
from coordinator.core.flow import Admitted, Decision, FlowPolicy, FlowRequest, FlowScheduler, Queued, Reason, Refused


class FlowRefused(Exception):
    """The request will not run: ``reason`` is one of
    :data:`coordinator.core.flow.Reason`; ``waited`` is the seconds it waited."""

    def __init__(self, request: FlowRequest, reason: Reason, waited: float) -> None:
        super().__init__(f"{request.pool}: refused ({reason}) after {waited:.3f} s")
        self.request, self.reason, self.waited = request, reason, waited


def refusal_message(refused: FlowRefused, flow: FlowSettings, *, section: str, who: str, retry: str,
                    where: str = "") -> str:
    """Why flow control would not run ``refused``'s request, under the
    settings ``flow`` found at ``section`` (``gateway.flow``, ``caller.flow``):
    ``who`` names the one whose limit it reached (``this key's tenant``),
    ``where`` says where its requests wait (`` in this process``, or nothing),
    ``retry`` ends the sentence (``try again shortly``)."""
    model = refused.request.pool
    if refused.reason == "deadline":
        return (f"{model}: no place freed within {refused.waited:.1f} s of waiting ({section}.max_wait "
                f"{flow.max_wait:g} s); {retry}")
    if refused.reason == "tenant_limit":
        tenant = refused.request.tenant
        limit = flow.share(tenant).max_queued
        setting = (f"the max_queued of {tenant!r} in {section}.tenants" if any(t.name == tenant for t in flow.tenants)
                   else f"{section}.default.max_queued")
        return f"{who} already has {limit} requests waiting{where}, its limit ({setting}); {retry}"
    if refused.reason == "displaced":
        return (f"{model}: the queue is full ({section}.max_queued {flow.max_queued}) and this request gave its "
                f"place to one of a higher priority or of a tenant with less of the queue; {retry}")
    return (f"{model}: {flow.max_queued} requests already wait for it{where} ({section}.max_queued) and none "
            f"ranks after this one; {retry}")


class ClientGone(Exception):
    """The client went away while its request waited: it left the queue."""


class FlowMetrics(Protocol):
    def flow_queued(self, tenant: str, count: int) -> None: ...

    def flow_refused(self, tenant: str, reason: str) -> None: ...


class _Waiter:
    """A request waiting in the gate: its decision once made (under the
    gate's lock), and the future on its own loop that wakes it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: str | None) -> None:
        self.loop, self.key = loop, key
        self.future: asyncio.Future[None] = loop.create_future()
        self.decision: Admitted | Refused | None = None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class FlowGate:
    def __init__(self, policy: FlowPolicy, metrics: FlowMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 demand: Callable[[str, int], None] | None = None) -> None:
        self._scheduler = FlowScheduler(policy)
        self._metrics = metrics
        self._clock = clock
        self._demand = demand
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}

    def ticket(self, tenant: str, pool: str, priority: int, cost: float, deadline: float) -> FlowRequest:
        """A request to offer, with an id of its own (``deadline`` on this gate's clock)."""
        return FlowRequest(next(self._ids), tenant, pool, priority, cost, deadline)

    async def enter(self, request: FlowRequest, gone: Callable[[], Awaitable[object]] | None = None,
                    key: str | None = None) -> None:
        """Return once ``request`` is admitted; it then holds its place until
        :meth:`leave`. Raises :class:`FlowRefused` (no room to wait, its
        tenant's limit, pushed out, or past its deadline) or
        :class:`ClientGone` (``gone()`` returned while it waited). Cancelled,
        it leaves the queue — or gives back a place it was just given.
        While it waits it counts as demand for ``key`` (a model@type)."""
        entered = self._clock()
        loop = asyncio.get_running_loop()
        with self._lock:
            offer = self._scheduler.offer(request, entered)
            waiter = None
            if isinstance(offer.verdict, Queued):
                waiter = self._waiters[request.id] = _Waiter(loop, key)
                self._count_demand(waiter, 1)
            wakes = self._decide([*offer.others, offer.verdict], request.tenant)
        self._wake(wakes)
        if isinstance(offer.verdict, Refused):
            raise FlowRefused(request, offer.verdict.reason, 0.0)
        if waiter is None:
            return
        decision = await self._wait(request, waiter, gone)
        if isinstance(decision, Refused):
            raise FlowRefused(request, decision.reason, self._clock() - entered)

    def leave(self, request: FlowRequest, cost: float | None = None) -> None:
        """``request`` is done (it may have run or not; twice is harmless):
        its place goes to the next, its tenant charged ``cost`` if given."""
        with self._lock:
            wakes = self._decide(self._scheduler.release(request.id, self._clock(), cost), request.tenant)
        self._wake(wakes)

    def queued(self) -> int:
        with self._lock:
            return self._scheduler.queued()

    def in_flight(self) -> int:
        with self._lock:
            return self._scheduler.in_flight()

    async def _wait(self, request: FlowRequest, waiter: _Waiter,
                    gone: Callable[[], Awaitable[object]] | None) -> Admitted | Refused:
        watcher = asyncio.ensure_future(gone()) if gone is not None else None
        decided = False
        try:
            while waiter.decision is None:
                left = request.deadline - self._clock()
                if left <= 0:
                    # Its own deadline: refuse what is overdue (this one included).
                    with self._lock:
                        wakes = self._decide(self._scheduler.expire(self._clock()), request.tenant)
                    self._wake(wakes)
                    assert waiter.decision is not None, f"{request} outlived its deadline"
                    break
                await asyncio.wait([waiter.future, *([watcher] if watcher else [])], timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)
                if watcher is not None and watcher.done():  # gone, even if admitted just now
                    raise ClientGone()
            decided = True
            return waiter.decision
        finally:
            with self._lock:
                del self._waiters[request.id]
                if waiter.decision is None:  # leaving the queue undecided: no longer demand
                    self._count_demand(waiter, -1)
                wakes = [] if decided else self._decide(
                    self._scheduler.release(request.id, self._clock()), request.tenant)
            self._wake(wakes)
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

    def _decide(self, decisions: Iterable[Decision], tenant: str) -> list[tuple[_Waiter, FlowRequest]]:
        """Under the lock: give the waiting requests ``decisions`` concern
        their decision, count the refusals, report the queues of every tenant
        they touched; the waiting requests to wake (after the lock)."""
        touched = {tenant}
        wakes: list[tuple[_Waiter, FlowRequest]] = []
        for decision in decisions:
            request = decision.request
            touched.add(request.tenant)
            if isinstance(decision, Refused) and self._metrics is not None:
                self._metrics.flow_refused(request.tenant, decision.reason)
            if isinstance(decision, Admitted | Refused):
                waiter = self._waiters.get(request.id)
                if waiter is not None and waiter.decision is None:
                    waiter.decision = decision
                    self._count_demand(waiter, -1)
                    wakes.append((waiter, request))
        if self._metrics is not None:
            for name in touched:
                self._metrics.flow_queued(name, self._scheduler.queued(name))
        return wakes

    def _count_demand(self, waiter: _Waiter, change: int) -> None:
        if self._demand is not None and waiter.key is not None:
            self._demand(waiter.key, change)

    def _wake(self, wakes: list[tuple[_Waiter, FlowRequest]]) -> None:
        """Wake each decided request on its own loop."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for waiter, request in wakes:
            if waiter.loop is here:
                _wake(waiter.future)
                continue
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # its loop is closed: no one waits there any more
                if isinstance(waiter.decision, Admitted):
                    self.leave(request)  # the place it was given goes to the next
