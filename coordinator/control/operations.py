"""Operations: what the coordinator does to workers, in each model's turn.

- **Turns.** Every operation on a ``model@type`` — a driver's apply, startup or
  shutdown, and each keeper round — runs in that key's turn
  (:class:`OperationQueue`): one at a time per model, concurrently across
  models, identical waiting operations merged.
- **Fan-out.** One proxy call per target endpoint, all at once, under the
  caller's deadline; one output per target, a proxy's failure being that
  target's failed output (:meth:`Operations.fan_out`); or one call with a
  second one if it fails, both under one drain (:meth:`Operations.one_or_else`).
- **Rollouts.** Batches with a health gate between them that takes only
  evidence newer than the batch (:meth:`Operations.roll`).
- **What is being operated on**, for the keeper: an instance under an
  operation, or restarted, started or reconfigured by one and not ready
  again yet, is not missing — the keeper neither replaces it nor starts a
  copy beside it (:meth:`Operations.operating`).
- **Draining.** Before an instance is stopped, restarted or reconfigured, it
  leaves the route table and the embedded registries list it unhealthy; the
  operation then waits until the requests in flight on it, summed over every
  caller that reports, have ended — and, where DB-GPT's own servers read an
  embedded registry, until ``drain.grace`` after it last showed them the
  instance — or ``drain.timeout`` passes (:meth:`Operations.fan_out`).

It reads and updates the fleet's view (:class:`FleetView`) and calls proxies
through the :class:`ProxyLink`; it owns no other state.

Why this module is long: the five above are one mechanism — a turn holds the
instances it operates on, drains them, fans the calls out and tells the
keeper what it left behind — and each part reads the others' bookkeeping
(the operating marks, the drain's note on every output, the deadline it
leaves). Split into modules they would pass that state back and forth.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from coordinator.core.config import CoordinatorConfig
from coordinator.core.errors import ModelBusyError, NoInstancesError, UnknownEndpointError
from coordinator.control.fleet_view import FleetView, LinkError, ProxyLink
from coordinator.core.liveset import apply_targets, manager_endpoints
from coordinator.core.longpoll import ChangeFeed
from coordinator.plumbing.metrics import Metrics
from coordinator.core.models import (
    WORKER_MANAGER_KEY,
    ApplyResult,
    ApplyType,
    Endpoint,
    SupportsOutcome,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
)
from coordinator.core.ordering import OperationQueue, QueueFull
from coordinator.core.rollout import ApplyOptions, ApplyPlan, RolloutProgress, not_attempted, plan_batches

T = TypeVar("T")

#: Seconds the coordinator waits for a proxy beyond the worker call's own bound.
PROXY_MARGIN = 5.0
#: Of a caller's timeout, what is kept back so that the answer reaches it in
#: time (at most this, at most a quarter): the worker calls get the rest.
ANSWER_MARGIN = 1.0
#: Operations after which an instance is expected back (not gone for good).
_COMES_BACK = {"startup", ApplyType.START.value, ApplyType.RESTART.value, ApplyType.UPDATE_PARAMS.value}
#: Operations that take an instance out of service: drained first.
DRAINS = {"shutdown", ApplyType.STOP.value, ApplyType.RESTART.value, ApplyType.UPDATE_PARAMS.value}
#: Seconds between looks at the in-flight count while draining (a count also
#: falls when a caller's reports expire, which wakes no one).
DRAIN_LOOK = 0.5


class Drain(NamedTuple):
    """Drain ``key``'s instances at the targets for at most ``timeout`` seconds first."""

    key: str
    timeout: float


class Call(NamedTuple):
    """One proxy operation: its name, its argument, and what it is, in words."""

    op: str
    req: Any
    what: str


@dataclass
class _Held:
    """An operation's hold on its targets: what the drain took, the time left
    after it (seconds; None: no deadline), and the outputs once there are."""

    drained: str = ""
    budget: float | None = None
    outputs: list[WorkerApplyOutput] = field(default_factory=list)


def ends_at(timeout: float | None) -> float | None:
    """When an operation's worker calls must have ended (event-loop time), given
    the caller's timeout from now: a little before it, so the answer arrives
    in time."""
    if timeout is None:
        return None
    return asyncio.get_running_loop().time() + timeout - min(ANSWER_MARGIN, timeout / 4)


class Operations:
    def __init__(
        self, config: CoordinatorConfig, view: FleetView, proxies: ProxyLink, metrics: Metrics, feed: ChangeFeed,
        clock: Callable[[], float] = time.time, load_feed: ChangeFeed | None = None,
        hear_callers_for: float = 0.0,
    ) -> None:
        self._config = config
        self._view = view
        self._proxies = proxies
        self._metrics = metrics
        self._feed = feed
        self._load_feed = load_feed or feed  # woken by load reports (what a drain waits on)
        #: Until when (monotonic) a drain waits anyway: a coordinator that was
        #: just restarted has not heard from every caller yet, and one it has
        #: not heard from may still choose an instance from an older table.
        self._heard_all_by = time.monotonic() + hear_callers_for
        self._clock = clock
        self._queue = OperationQueue(config.max_queued_operations, metrics.queued_operations)
        self.rollouts: dict[str, RolloutProgress] = {}
        #: key -> endpoint -> number of operations running on it now
        self._running: dict[str, dict[Endpoint, int]] = {}
        #: key -> endpoint -> unix time until which a finished operation's
        #: instance is expected back (not counted missing while not ready)
        self._returning: dict[str, dict[Endpoint, float]] = {}

    # ---- turns ----------------------------------------------------------

    async def in_turn(self, key: str, start: Callable[[], Awaitable[T]], same: tuple[str, ...]) -> T:
        """Run ``start()`` in ``key``'s turn: joined with an identical waiting
        operation, refused when too many wait, and owning the turn until its
        last worker call has ended — if the caller stops waiting, the operation
        carries on under its own deadline, and the next one on that key waits
        for it."""
        try:
            return await self._queue.run(key, start, same)
        except QueueFull as full:
            self._metrics.operation(same[0], "busy")
            raise ModelBusyError(full.key, full.depth) from None

    def busy_keys(self) -> list[str]:
        return self._queue.busy_keys()

    def depths(self) -> dict[str, int]:
        return self._queue.depths()

    # ---- what is being operated on -------------------------------------

    def operating(self, key: str) -> frozenset[Endpoint]:
        """The instances of ``key`` an operation is running on, or that one
        restarted, started or reconfigured less than ``reconcile.appear_within``
        ago (the keeper counts them as starting while they are not ready)."""
        now = self._clock()
        returning = self._returning.get(key, {})
        unreachable = self._view.unreachable()
        ready = {i.endpoint for i in self._view.live.of_key(key) if i.healthy and i.endpoint not in unreachable}
        # Back (ready once): the mark is spent — if it dies later, it is missing like any other.
        for ep in [ep for ep, until in returning.items() if until <= now or ep in ready]:
            del returning[ep]
        return frozenset(self._running.get(key, {})) | frozenset(returning)

    def drain_for(self, key: str, kind: str, timeout: float | None = None) -> Drain | None:
        """The drain an operation of ``kind`` on ``key`` needs (None: it takes
        nothing out of service, or draining is off); ``timeout`` overrides
        the config's ``drain.timeout``."""
        timeout = self._config.drain.timeout if timeout is None else timeout
        return Drain(key, timeout) if kind in DRAINS and timeout > 0 else None

    async def _drain(self, drain: Drain, targets: list[Endpoint], ends: float | None) -> str:
        """Wait (bounded) until every reporting caller has applied the route
        table without the drained instances and has nothing in flight on
        them, and readers that report nothing have had ``drain.grace``; what
        it took, for the operation's output."""
        instances = [(drain.key, ep.host, ep.port) for ep in targets]
        mark = self._view.routes.position
        loop = asyncio.get_running_loop()
        started = loop.time()
        until = started + drain.timeout
        if ends is not None:  # half of what is left of the caller's time at most: the operation needs the rest
            until = min(until, started + (ends - started) / 2)

        def busy() -> bool:
            return any(self._view.settled(instances, mark)) or time.monotonic() < self._heard_all_by

        while busy() and loop.time() < until:
            await self._load_feed.wait_until(lambda: not busy(), min(DRAIN_LOOK, until - loop.time()))
        grace = self._config.drain.grace
        registries = self._view.registries
        if grace > 0 and registries.present and loop.time() < until:
            quiet = await registries.quiet_for(instances)
            if quiet is not None and quiet < grace:
                await asyncio.sleep(max(0.0, min(grace - quiet, until - loop.time())))
        left, behind = self._view.settled(instances, mark)
        took = loop.time() - started
        if left or behind:
            unheard = f", {behind} caller(s) not yet past the route change" if behind else ""
            return f"drain timed out after {took:.1f} s with {left} request(s) still in flight{unheard}"
        return f"drained in {took:.1f} s, 0 in flight"

    def _begin(self, key: str, targets: list[Endpoint]) -> None:
        running = self._running.setdefault(key, {})
        for ep in targets:
            running[ep] = running.get(ep, 0) + 1
            self._returning.get(key, {}).pop(ep, None)

    def _end(self, key: str, op: str, outputs: list[WorkerApplyOutput], targets: list[Endpoint]) -> None:
        running = self._running.get(key, {})
        for ep in targets:
            running[ep] -= 1
            if not running[ep]:
                del running[ep]
        if not running:
            self._running.pop(key, None)
        if op in _COMES_BACK:
            until = self._clock() + self._config.reconcile.appear_within
            for ep, out in zip(targets, outputs):
                if out.success:
                    self._returning.setdefault(key, {})[ep] = until
            self._view.started((key, ep.host, ep.port) for ep, out in zip(targets, outputs) if out.success)

    # ---- a driver's operations ------------------------------------------

    async def apply(self, req: WorkerApplyRequest, options: ApplyOptions) -> ApplyResult | ApplyPlan:
        if options.dry_run:
            return ApplyPlan(key=req.key, apply_type=req.apply_type, batches=self._plan(req, options))
        ends = ends_at(options.timeout)
        same = ("apply", req.model_dump_json(), options.model_dump_json(exclude={"timeout"}))
        return await self.in_turn(req.key, lambda: self._apply(req, options, ends), same)

    def _plan(self, req: WorkerApplyRequest, options: ApplyOptions) -> list[list[Endpoint]]:
        targets = apply_targets(self._view.live.of_key(req.key), req.model, req.worker_type)
        if not targets:
            self._metrics.operation("apply", "error")
            raise NoInstancesError(req.key)
        return plan_batches(targets, options.max_unavailable)

    async def _apply(self, req: WorkerApplyRequest, options: ApplyOptions, ends: float | None) -> ApplyResult:
        batches = self._plan(req, options)
        wire = req.model_dump_json()  # serialised once per apply, not once per proxy
        if len(batches) == 1:
            what = f"apply {req.apply_type.value} {req.key}"
            return ApplyResult.of(await self.fan_out(
                batches[0], "apply", wire, what, ends, req.key, req.apply_type.value,
                drain=self.drain_for(req.key, req.apply_type.value, options.drain_timeout)))
        health_timeout = options.health_timeout or self._config.timeouts.rollout_health
        return ApplyResult.of(await self.roll(req, wire, batches, health_timeout, ends, options.drain_timeout))

    async def lifecycle(self, op: str, req: WorkerStartupRequest, timeout: float | None,
                        drain_timeout: float | None = None) -> WorkerApplyOutput:
        """A startup or shutdown of one model on one worker manager (a
        shutdown drained first, for at most ``drain_timeout`` s: None, the
        config's ``drain.timeout``)."""

        async def operation() -> WorkerApplyOutput:
            if not self._view.live.has_endpoint(req.endpoint):
                self._metrics.operation(op, "error")
                raise UnknownEndpointError(req.host, req.port)
            [output] = await self.fan_out([req.endpoint], op, req, f"{op} {req.key}", ends, req.key,
                                          drain=self.drain_for(req.key, op, drain_timeout))
            if op == "shutdown" and not output.success and not self._runs_there(req):
                # DB-GPT answers a bare 500 for a model it does not run: say so.
                output = output.model_copy(update={"message": (
                    f"{output.message} ({req.key} is not running on {req.endpoint}: "
                    "no registry lists it there)")})
            return output

        ends = ends_at(timeout)
        return await self.in_turn(req.key, operation, (op, req.model_dump_json()))

    def _runs_there(self, req: WorkerStartupRequest) -> bool:
        return any(i.endpoint == req.endpoint for i in self._view.live.of_key(req.key))

    async def supports(self) -> list[SupportsOutcome]:
        """``GET /models/supports`` on every healthy, reachable worker manager."""
        unreachable = self._view.unreachable()
        managers = self._view.live.of_key(WORKER_MANAGER_KEY)
        targets = [ep for ep in manager_endpoints(managers) if ep not in unreachable]
        return await self.each(
            targets, "supports", (), None,
            lambda ep, exc: SupportsOutcome(endpoint=ep, error=f"{ep}: supports failed: {exc}"),
        )

    # ---- rollouts -------------------------------------------------------

    async def roll(
        self, req: WorkerApplyRequest, wire: str, batches: list[list[Endpoint]], health_timeout: float,
        ends: float | None = None, drain_timeout: float | None = None,
    ) -> list[WorkerApplyOutput]:
        progress = RolloutProgress(key=req.key, batches=len(batches))
        self.rollouts[req.key] = progress
        drain = self.drain_for(req.key, req.apply_type.value, drain_timeout)
        outputs: list[WorkerApplyOutput] = []
        loop = asyncio.get_running_loop()
        try:
            for i, batch in enumerate(batches, 1):
                if i > 1 and ends is not None and ends <= loop.time():
                    outputs += not_attempted([ep for b in batches[i - 1:] for ep in b], "the caller's deadline passed")
                    progress.phase = "stopped"
                    break
                progress.current, progress.phase = batch, "draining" if drain else "applying"
                what = f"apply {req.apply_type.value} {req.key} (batch {i}/{len(batches)})"
                done = await self.fan_out(batch, "apply", wire, what, ends, req.key, req.apply_type.value,
                                          drain=drain, on_drained=lambda: setattr(progress, "phase", "applying"))
                outputs += done
                rest = [ep for later in batches[i:] for ep in later]
                if not all(o.success for o in done):
                    outputs += not_attempted(rest, f"batch {i} of {len(batches)} failed")
                    progress.phase = "stopped"
                    break
                progress.phase = "waiting for health"
                batch_ended = loop.time()
                await self._probe_now(batch)
                if ends is not None:
                    health_timeout = min(health_timeout, max(0.0, ends - loop.time()))
                if not await self._feed.wait_until(
                    lambda: self._batch_healthy(req.key, batch, batch_ended), health_timeout
                ):
                    outputs += not_attempted(rest, f"batch {i} not healthy within {health_timeout:g} s")
                    progress.phase = "stopped"
                    break
                progress.done = i
            else:
                progress.phase = "finished"
        finally:
            self.rollouts.pop(req.key, None)
        return outputs

    async def _probe_now(self, batch: list[Endpoint]) -> None:
        """Ask the batch's proxies to probe their workers now: the health gate
        takes only evidence that is newer than the batch's operation."""
        states = await self.each(batch, "probe_now", (), self._config.probe.timeout + 1.0, lambda ep, exc: None)
        now = asyncio.get_running_loop().time()
        for ep, state in zip(batch, states):
            if state is not None:
                self._view.report_probe(ep, state, now, notify=False)
        self._view.changed()

    def _batch_healthy(self, key: str, batch: list[Endpoint], since: float) -> bool:
        """Every instance of the batch registered healthy, and found reachable
        by a probe whose word arrived after ``since`` (the batch's end): a
        snapshot from before the batch restarted proves nothing."""
        healthy = {i.endpoint for i in self._view.live.of_key(key) if i.healthy}
        return all(ep in healthy and self._view.answered_since(ep, since) for ep in batch)

    # ---- proxies --------------------------------------------------------

    async def fan_out(
        self, targets: list[Endpoint], op: str, req: Any, what: str, ends: float | None = None,
        key: str | None = None, kind: str | None = None, drain: Drain | None = None,
        on_drained: Callable[[], None] = lambda: None,
    ) -> list[WorkerApplyOutput]:
        """Run proxy operation ``op`` on every target: one output per target, in
        target order; a proxy failure is that target's failed output. With
        ``ends`` (the caller's deadline, loop time), every worker call ends by
        then, and none starts after it. With ``key``, the targets count as
        operated on (:meth:`operating`) while it runs, and after it as ``kind``
        (``op`` unless given) says. With ``drain``, the targets are drained
        first (see :meth:`_drain`), and back in the route table once it ends;
        each output says what the drain took."""
        budget = None if ends is None else ends - asyncio.get_running_loop().time()
        if budget is not None and budget <= 0:
            return [WorkerApplyOutput(message=f"{ep}: {what} not sent: the caller's deadline passed before its turn",
                                      success=False, timecost=0, host=ep.host, port=ep.port) for ep in targets]
        async with self._held(targets, ends, key, kind or op, drain, on_drained) as held:
            held.outputs = await self._send(targets, Call(op, req, what), held.budget)
        return self._account(op, held.outputs, held.drained)

    async def one_or_else(self, ep: Endpoint, first: Call, second: Call, key: str, kind: str,
                          drain: Drain | None = None) -> tuple[WorkerApplyOutput, WorkerApplyOutput | None]:
        """``first`` on one instance and, only if it fails, ``second`` — one
        operation on ``key`` (counted after it as ``kind`` says), under one
        drain: the instance leaves the route table once, stays out between the
        two calls, and comes back only if neither worked. The outputs of both
        (None: ``second`` was not needed)."""
        async with self._held([ep], None, key, kind, drain, lambda: None) as held:
            [out] = await self._send([ep], first, held.budget)
            held.outputs = [out]
            then = None
            if not out.success:
                [then] = await self._send([ep], second, held.budget)
                held.outputs = [then]
        [out] = self._account(first.op, [out], held.drained)
        if then is not None:
            [then] = self._account(second.op, [then], held.drained)
        return out, then

    @asynccontextmanager
    async def _held(self, targets: list[Endpoint], ends: float | None, key: str | None, kind: str,
                    drain: Drain | None, on_drained: Callable[[], None]) -> AsyncIterator[_Held]:
        """The targets held for an operation while the block runs: counted as
        operated on under ``key``, drained first with ``drain``; the block
        sets ``outputs`` — what counts as done once it ends (a target a
        ``kind`` that does not come back worked on stays out of the routes)."""
        held = _Held()
        if key is not None:
            self._begin(key, targets)
        try:
            if drain is not None:
                self._view.drain((drain.key, ep.host, ep.port) for ep in targets)
                held.drained = await self._drain(drain, targets, ends)
                on_drained()
            held.budget = None if ends is None else ends - asyncio.get_running_loop().time()
            yield held
        finally:
            if drain is not None:
                gone = [] if kind in _COMES_BACK else [
                    (drain.key, ep.host, ep.port) for ep, out in zip(targets, held.outputs) if out.success]
                self._view.undrain(((drain.key, ep.host, ep.port) for ep in targets), stopped=gone)
            if key is not None:
                self._end(key, kind, held.outputs, targets)

    async def _send(self, targets: list[Endpoint], call: Call, budget: float | None) -> list[WorkerApplyOutput]:
        # To the proxies as a wall-clock time: it counts the time a call
        # takes to reach its proxy (one that is still starting, say).
        deadline_at = None if budget is None else time.time() + budget
        return await self.each(
            targets, call.op, (call.req, deadline_at), budget,
            lambda ep, exc: WorkerApplyOutput(
                message=f"{ep}: {call.what} failed: {exc}", success=False, timecost=-1, host=ep.host, port=ep.port
            ),
        )

    def _account(self, op: str, outputs: list[WorkerApplyOutput], drained: str) -> list[WorkerApplyOutput]:
        """The outputs, each saying what the drain took; counted in the metrics."""
        if drained:
            outputs = [o.model_copy(update={"message": f"{o.message} ({drained})"}) for o in outputs]
        for o in outputs:
            if o.timecost is not None and o.timecost >= 0:
                self._metrics.instance_latency(op, o.timecost)
        self._metrics.operation(op, "success" if all(o.success for o in outputs) else "failure")
        return outputs

    async def each(
        self, targets: list[Endpoint], op: str, args: tuple[Any, ...], budget: float | None,
        failed: Callable[[Endpoint, LinkError], T],
    ) -> list[T]:
        """Call ``op`` on every target's proxy at once, under the operation's
        deadline; a proxy that fails becomes ``failed(endpoint, error)``."""
        deadline = self._deadline(op) if budget is None else budget + PROXY_MARGIN

        async def one(ep: Endpoint) -> T:
            try:
                return await self._proxies.call(ep, op, *args, deadline=deadline)
            except LinkError as exc:
                return failed(ep, exc)

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(ep)) for ep in targets]
        return [t.result() for t in tasks]

    def _deadline(self, op: str) -> float:
        """How long to wait for a proxy: its operation timeout, plus the connect
        attempts it may retry, plus a margin."""
        t = self._config.timeouts
        return t.for_operation(op) + 3 * t.connect + PROXY_MARGIN
