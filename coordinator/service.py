"""The coordinator's logic, as a plain asyncio object.

It follows every watcher (long poll), merges their snapshots into the live set,
keeps one proxy per live endpoint, and dispatches operations through the proxies.
It talks to watchers and proxies only through the two links it is given
(:class:`WatcherLink`, :class:`ProxyLink`): the Ray implementations live in
``coordinator.ray_links``, and tests pass in-process fakes.

Its state is soft. After a restart it is rebuilt from the watchers; nothing here
needs to survive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from coordinator.config import CoordinatorConfig, WorkerAccess
from coordinator.deployments import Decision, Deployment, DeploymentStatus, Manager, Seen
from coordinator.errors import (
    DeploymentNotReadyError,
    ModelBusyError,
    NoInstancesError,
    UnknownEndpointError,
    WaitTimeoutError,
)
from coordinator.changes import Change, ChangeLog
from coordinator.inference import Route, route_identity
from coordinator.keeper import Keeper, Store
from coordinator.liveset import LiveSet, apply_targets, filter_instances, manager_endpoints
from coordinator.longpoll import ChangeFeed
from coordinator.metrics import Metrics, NoMetrics, live_counts
from coordinator.models import (
    WORKER_MANAGER_KEY,
    ApplyResult,
    ApplyType,
    Endpoint,
    ModelInstance,
    SupportsOutcome,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
    parse_worker_key,
    worker_key,
)
from coordinator.ordering import OperationQueue, QueueFull
from coordinator.rollout import ApplyOptions, ApplyPlan, RolloutProgress, not_attempted, plan_batches
from actors.registry_state import MemoryStateStore
from coordinator.status import ClusterStatus, InstanceStatus, WatcherStatus

log = logging.getLogger(__name__)


T = TypeVar("T")

#: Seconds between re-recordings of the live-instance gauges when nothing changed.
GAUGE_REFRESH = 5.0
#: At most this often after a change.
GAUGE_INTERVAL = 1.0
#: Seconds a call made right after a (re)start waits for the watchers' first
#: answers before it reads the live set.
REBUILD_WAIT = 15.0
#: Seconds the coordinator waits for a proxy beyond the worker call's own bound.
PROXY_MARGIN = 5.0
#: Of a caller's timeout, what is kept back so that the answer reaches it in
#: time (at most this, at most a quarter): the worker calls get the rest.
ANSWER_MARGIN = 1.0


def _ends(timeout: float | None) -> float | None:
    """When an operation's worker calls must have ended (event-loop time), given
    the caller's timeout from now: a little before it, so the answer arrives
    in time."""
    if timeout is None:
        return None
    return asyncio.get_running_loop().time() + timeout - min(ANSWER_MARGIN, timeout / 4)


class LinkError(Exception):
    """A watcher or proxy could not be reached (dead, restarting, too slow)."""


class WatcherLink(Protocol):
    async def listen(self, source: str, since: tuple[str, int] | None, timeout: float) -> Change | None: ...

    async def status(self, source: str) -> WatcherStatus: ...


class ProxyLink(Protocol):
    def endpoints(self) -> set[Endpoint]: ...

    def ensure(self, endpoint: Endpoint, access: WorkerAccess) -> None: ...

    def retire(self, endpoint: Endpoint) -> None: ...

    async def call(self, endpoint: Endpoint, method: str, *args: Any, deadline: float) -> Any:
        """Run ``method`` on the endpoint's proxy; raise :class:`LinkError` when the
        proxy itself failed (it never raises for the worker's failures)."""
        ...


class RegistryLink(Protocol):
    def tell(self, unreachable: frozenset[Endpoint]) -> None:
        """Tell the embedded registries which endpoints the probes find unreachable."""
        ...


class _NoRegistries:
    def tell(self, unreachable: frozenset[Endpoint]) -> None:
        pass


class Reachability(Protocol):
    reachable: bool | None
    last_error: str | None


class CoordinatorService:
    def __init__(
        self,
        config: CoordinatorConfig,
        watchers: WatcherLink,
        proxies: ProxyLink,
        name: str = "",
        namespace: str = "",
        metrics: Metrics | None = None,
        store: Store | None = None,
        registries: RegistryLink | None = None,
    ) -> None:
        self.config = config
        self._registries = registries or _NoRegistries()
        self._told: frozenset[Endpoint] = frozenset()  # what the registries were last told
        self._metrics = metrics or NoMetrics()
        self.name, self.namespace = name, namespace
        self._watchers = watchers
        self._proxies = proxies
        self._sources = [s.name for s in config.registries]
        self._heard: set[str] = set()  # sources whose watcher has answered once
        self._live = LiveSet(self._sources)
        self._gauge_keys: set[str] = set()  # worker keys whose gauges are out of date
        self._probes: dict[Endpoint, Reachability] = {}
        self._probed_at: dict[Endpoint, float] = {}  # when that word arrived (loop time)
        self._down: set[Endpoint] = set()  # the endpoints whose last word is "unreachable"
        self._queue = OperationQueue(config.max_queued_operations, self._metrics.queued_operations)
        self._rollouts: dict[str, RolloutProgress] = {}
        self._feed = ChangeFeed()
        #: Where requests may go, for callers to follow (routes_since).
        self._routes: ChangeLog[tuple[str, str, int], Route] = ChangeLog(route_identity)
        probe = config.probe
        self._keeper = Keeper(
            _Fleet(self), store or MemoryStateStore(), f"deployments/{namespace}/{name}", config.reconcile,
            startup_timeout=config.timeouts.startup, metrics=self._metrics,
            # the first round waits until a dead worker's probes have had time to say so
            settle=probe.interval * probe.failures_to_dead + probe.timeout if probe.enabled else 0.0,
        )

    # ---- following the watchers -----------------------------------------

    async def run(self) -> None:
        """Follow every watcher until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for source in self._sources:
                tg.create_task(self._follow(source), name=f"follow {source}")
            tg.create_task(self._republish_gauges(), name="gauges")
            tg.create_task(self._resync(), name="resync")
            tg.create_task(self._keep(), name="deployments")

    async def _keep(self) -> None:
        while True:
            try:
                await self._keeper.load(self.config.deployments)
                break
            except Exception:  # the GCS unreachable: keep following, try again
                log.exception("loading the kept deployments failed")
                await asyncio.sleep(self.config.backoff.delay(2))
        await self._keeper.run()

    async def _follow(self, source: str) -> None:
        since: tuple[str, int] | None = None
        failures = 0
        while True:
            try:
                change = await self._watchers.listen(source, since, self.config.long_poll_timeout)
            except LinkError as exc:
                # Keep the last snapshot: a dead watcher is not an empty registry.
                failures += 1
                if failures == 1:
                    log.warning("watcher %s unavailable, keeping its last snapshot: %s", source, exc)
                await asyncio.sleep(self.config.backoff.delay(failures))
                continue
            except Exception:  # the loop survives; this is a bug worth a traceback
                log.exception("following watcher %s failed", source)
                await asyncio.sleep(self.config.backoff.delay(1))
                continue
            failures = 0
            if change is None:
                continue
            since = (change.epoch, change.version)
            self._absorb(source, change)
            if self.config.change_pace:
                await asyncio.sleep(self.config.change_pace)  # a burst shares the next delta

    def _absorb(self, source: str, change: Change) -> None:
        """One watcher's change into the live set; proxies follow the endpoints
        it touched. Costs what the change carries."""
        self._heard.add(source)
        absorbed = self._live.absorb(source, change)
        self._gauge_keys |= absorbed.keys
        self._reroute(absorbed.identities)
        for ep in sorted(absorbed.endpoints):
            if self._live.has_endpoint(ep) and ep not in self._proxies.endpoints():
                self._ensure_proxy(ep)
            elif not self._live.has_endpoint(ep) and ep in self._proxies.endpoints():
                self._retire_proxy(ep)
        self._changed()

    def _ensure_proxy(self, ep: Endpoint) -> None:
        self._proxies.ensure(ep, self.config.access_for(ep, self._live.listed_by(ep)))

    def _retire_proxy(self, ep: Endpoint) -> None:
        self._proxies.retire(ep)
        self._probes.pop(ep, None)
        self._down.discard(ep)
        self._probed_at.pop(ep, None)
        self._reroute_endpoint(ep)
        self._tell_registries()

    def _changed(self) -> None:
        self._feed.notify()
        self._keeper.poke()

    async def _resync(self) -> None:
        """Every few seconds, repair any drift between the live set and the
        proxies: a proxy for every live endpoint (a lost or unfollowed one is
        started again), none for an endpoint that left."""
        while True:
            await asyncio.sleep(self.config.resync_interval)
            try:
                self._repair()
            except Exception:  # the loop survives; the logic raised
                log.exception("resync failed")

    def _tell_registries(self, always: bool = False) -> None:
        """The embedded registries list instances at unreachable endpoints as
        unhealthy: tell them when the set changes (and at every resync)."""
        unreachable = self._unreachable()
        if always or unreachable != self._told:
            self._told = unreachable
            self._registries.tell(unreachable)

    def _repair(self) -> None:
        self._tell_registries(always=True)
        live, have = self._live.endpoints(), self._proxies.endpoints()
        for ep in sorted(live):
            if ep not in have:
                log.warning("resync: %s had no proxy; starting one", ep)
            self._ensure_proxy(ep)
        for ep in sorted(have - live):
            log.warning("resync: %s left the registries but kept its proxy; retiring it", ep)
            self._retire_proxy(ep)

    def _record_live_instances(self, keys: set[str] | None = None) -> None:
        """The live-instance gauges of ``keys`` (every worker key when None),
        counted from those keys' instances only."""
        unreachable = self._unreachable()
        live = self._live.merged.values() if keys is None else (i for k in keys for i in self._live.of_key(k))
        self._metrics.live_instances(live_counts([
            (i.model_name, "unreachable" if i.endpoint in unreachable else "healthy" if i.healthy else "unhealthy")
            for i in live
        ]), keys)

    async def _republish_gauges(self) -> None:
        """The gauges of the models that changed are recorded at most once a
        second (a burst of changes costs one count, of those models only), and
        every gauge every few seconds regardless, so a scrape after a quiet
        hour (or after an exporter restart) still sees them."""
        quiet = 0.0
        while True:
            await asyncio.sleep(GAUGE_INTERVAL)
            quiet += GAUGE_INTERVAL
            if quiet >= GAUGE_REFRESH:
                self._gauge_keys, quiet = set(), 0.0
                self._record_live_instances()
                for key, depth in self._queue.depths().items():  # a gauge not re-reported ages out
                    self._metrics.queued_operations(key, depth)
            elif self._gauge_keys:
                keys, self._gauge_keys = self._gauge_keys, set()
                self._record_live_instances(keys)

    async def report_probe(self, endpoint: Endpoint, state: Reachability) -> None:
        """A proxy says its worker became reachable or unreachable."""
        endpoint = Endpoint(*endpoint)
        if endpoint in self._proxies.endpoints():
            self._record_probe(endpoint, state)
            log.info("%s is now %s", endpoint, "reachable" if state.reachable else f"unreachable ({state.last_error})")
            self._gauge_keys |= self._live.keys_at(endpoint)
            self._reroute_endpoint(endpoint)
            self._tell_registries()
            self._changed()

    async def ready(self, timeout: float) -> bool:
        """Whether every watcher has delivered its first snapshot within ``timeout``."""
        return await self._feed.wait_until(lambda: len(self._heard) == len(self._sources), timeout)

    async def _rebuilt(self) -> None:
        """Before an answer that reads the live set: right after a (re)start it
        is empty until the watchers have answered, and "no registry lists it"
        would be false. Waits (bounded) for every watcher's first answer."""
        if len(self._heard) < len(self._sources):
            await self.ready(REBUILD_WAIT)

    # ---- the route table -------------------------------------------------

    def _reroute(self, identities: set[tuple[str, str, int]]) -> None:
        """Bring the route table's entries for ``identities`` up to date: an
        entry is a route while it is listed healthy, enabled, and its endpoint
        is not found unreachable. Costs what changed."""
        for ident in identities:
            inst = self._live.merged.get(ident)
            if (inst is None or not inst.healthy or inst.enabled is False or inst.endpoint in self._down
                    or inst.model_name == WORKER_MANAGER_KEY):
                self._routes.remove(ident)
            else:
                self._routes.put(Route(inst.model_name, inst.host, inst.port, float(inst.weight or 0.0),
                                       tuple(self._live.listed_by(inst.endpoint))))

    def _reroute_endpoint(self, ep: Endpoint) -> None:
        """After the probes' verdict on ``ep`` changed (entries that left the
        live set were rerouted as they left)."""
        self._reroute({i.identity for i in self._live.at(ep)})

    async def routes_since(self, since: tuple[str, int] | None, timeout: float) -> Change | None:
        """Long poll of the route table: what changed since ``since`` (a
        :class:`Delta`, or a :class:`Snapshot` for a caller that is new or too
        far behind) as soon as anything did; None after ``timeout`` seconds of
        nothing. Callers keep their own copy and choose instances locally."""
        await self._rebuilt()
        if not await self._feed.wait_until(lambda: since != self._routes.position, timeout):
            return None
        return self._routes.since(since)

    # ---- reads ----------------------------------------------------------

    def _record_probe(self, ep: Endpoint, state: Reachability, at: float | None = None) -> None:
        self._probes[ep] = state
        self._probed_at[ep] = asyncio.get_running_loop().time() if at is None else at
        if state.reachable is False:
            self._down.add(ep)
        else:
            self._down.discard(ep)

    def _unreachable(self) -> frozenset[Endpoint]:
        """The endpoints the probes find unreachable (kept as they report, so
        this costs what is down, not the fleet)."""
        return frozenset(self._down)

    def _select(self, model: str | None, worker_type: str | None, healthy_only: bool) -> list[ModelInstance]:
        """The instances asked for, sorted; one key's instances only when the
        key is known (no scan of the fleet)."""
        live = self._live.of_key(worker_key(model, worker_type)) if model and worker_type else self._live.instances()
        return sorted(filter_instances(live, model, worker_type, healthy_only, self._unreachable()),
                      key=lambda i: i.identity)

    async def instances(
        self, model: str | None = None, worker_type: str | None = None, healthy_only: bool = True
    ) -> list[ModelInstance]:
        await self._rebuilt()
        return self._select(model, worker_type, healthy_only)

    async def wait_for(
        self, model: str, count: int, worker_type: str = "llm", timeout: float = 60.0
    ) -> list[ModelInstance]:
        """Wait until at least ``count`` healthy instances of the model are live."""

        def found() -> list[ModelInstance]:
            return self._select(model, worker_type, True)

        if not await self._feed.wait_until(lambda: len(found()) >= count, timeout):
            raise WaitTimeoutError(
                f"{worker_key(model, worker_type)}: {len(found())} of {count} healthy instances "
                f"after {timeout:g} s"
            )
        return found()

    async def status(self) -> ClusterStatus:
        async def watcher_status(source: str) -> WatcherStatus:
            try:
                return await self._watchers.status(source)
            except LinkError as exc:
                kind = self.config.source(source).kind
                return WatcherStatus(source=source, kind=kind, target="?", stale=True, last_error=str(exc))

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(watcher_status(s)) for s in self._sources]
        rows = []
        for inst in self._live.instances():
            name, wtype = parse_worker_key(inst.model_name)
            probe = self._probes.get(inst.endpoint)
            rows.append(
                InstanceStatus(
                    model=name, worker_type=wtype, host=inst.host, port=inst.port,
                    registry_healthy=bool(inst.healthy),
                    reachable=probe.reachable if probe else None,
                    probe_error=probe.last_error if probe and probe.reachable is False else None,
                    last_heartbeat=inst.last_heartbeat,
                )
            )
        return ClusterStatus(
            name=self.name, namespace=self.namespace, instances=rows,
            watchers=[t.result() for t in tasks], proxies=len(self._proxies.endpoints()),
            busy_keys=self._queue.busy_keys(), queued=self._queue.depths(), rollouts=list(self._rollouts.values()),
        )

    # ---- deployments ----------------------------------------------------

    async def deploy(self, specs: list[Deployment], wait: bool = False, timeout: float | None = None) -> list[int]:
        """Create or replace desired states; their generations. With ``wait``,
        until each is ready at that generation (or raise, with its status)."""
        generations = await self._keeper.deploy(specs)
        if wait:
            keys = [s.key for s in specs]

            def done() -> bool:
                return all(st.state == "ready" and st.observed_generation >= g
                           for st, g in zip((self._keeper.status(k) for k in keys), generations))

            if not await self._feed.wait_until(done, timeout or self.config.timeouts.startup):
                late = [st for st in (self._keeper.status(k) for k in keys) if st.state != "ready"]
                raise DeploymentNotReadyError(late[0].key if late else keys[0],
                                              _describe_status(late[0]) if late else "not observed yet")
        return generations

    async def undeploy(self, key: str, shutdown: bool = False) -> DeploymentStatus:
        return await self._keeper.undeploy(key, shutdown)

    async def deployments(self) -> list[DeploymentStatus]:
        await self._rebuilt()
        return self._keeper.statuses()

    async def plan_deploy(self, specs: list[Deployment]) -> list[tuple[str, Decision]]:
        """What a round would do for each spec now; nothing is sent or kept."""
        await self._rebuilt()
        return self._keeper.plan(specs)

    def deployed(self, key: str) -> Deployment | None:
        return self._keeper.spec(key)

    def _observe(self, key: str) -> tuple[list[Seen], list[Manager]]:
        """The deployment's view of the live set: its model's instances, and
        every worker manager with the models it runs."""

        def reach(ep: Endpoint) -> bool | None:
            state = self._probes.get(ep)
            return None if state is None else state.reachable

        seen = [Seen(i.endpoint, bool(i.healthy), reach(i.endpoint)) for i in self._live.of_key(key)]
        managers = [
            Manager(m.endpoint, bool(m.healthy) and reach(m.endpoint) is not False,
                    sum(1 for i in self._live.at(m.endpoint) if i.healthy and i.model_name != WORKER_MANAGER_KEY))
            for m in self._live.of_key(WORKER_MANAGER_KEY)
        ]
        return sorted(seen), sorted(managers)

    # ---- operations -----------------------------------------------------

    async def apply(self, req: WorkerApplyRequest, options: ApplyOptions | None = None) -> ApplyResult | ApplyPlan:
        """Apply to every registered instance of the model, healthy or not: all
        at once, or in batches of ``options.max_unavailable`` with a health gate
        between them; with ``options.dry_run``, only say what would be done —
        a read, answered from the live set at once, never queued behind the
        model's operations."""
        options = options or ApplyOptions(apply_type=req.apply_type)
        await self._rebuilt()
        if options.dry_run:
            return ApplyPlan(key=req.key, apply_type=req.apply_type, batches=self._plan(req, options))
        ends = _ends(options.timeout)
        same = ("apply", req.model_dump_json(), options.model_dump_json(exclude={"timeout"}))
        return await self._in_turn(req.key, lambda: self._apply(req, options, ends), same)

    def _plan(self, req: WorkerApplyRequest, options: ApplyOptions) -> list[list[Endpoint]]:
        targets = apply_targets(self._live.of_key(req.key), req.model, req.worker_type)
        if not targets:
            self._metrics.operation("apply", "error")
            raise NoInstancesError(req.key)
        return plan_batches(targets, options.max_unavailable)

    async def _apply(self, req: WorkerApplyRequest, options: ApplyOptions, ends: float | None) -> ApplyResult:
        batches = self._plan(req, options)
        wire = req.model_dump_json()  # serialised once per apply, not once per proxy
        if len(batches) == 1:
            what = f"apply {req.apply_type.value} {req.key}"
            return ApplyResult.of(await self._fan_out(batches[0], "apply", wire, what, ends))
        health_timeout = options.health_timeout or self.config.timeouts.rollout_health
        return ApplyResult.of(await self._roll(req, wire, batches, health_timeout, ends))

    async def _in_turn(self, key: str, start: Callable[[], Awaitable[T]], same: tuple[str, ...]) -> T:
        """Run ``start()`` in ``key``'s turn (:class:`OperationQueue`): joined
        with an identical waiting operation, refused when too many wait, and
        owning the turn until its last worker call has ended — if the caller
        stops waiting, the operation carries on under its own deadline, and
        the next one on that key waits for it."""
        try:
            return await self._queue.run(key, start, same)
        except QueueFull as full:
            self._metrics.operation(same[0], "busy")
            raise ModelBusyError(full.key, full.depth) from None

    async def _roll(
        self, req: WorkerApplyRequest, wire: str, batches: list[list[Endpoint]], health_timeout: float,
        ends: float | None = None,
    ) -> list[WorkerApplyOutput]:
        progress = RolloutProgress(key=req.key, batches=len(batches))
        self._rollouts[req.key] = progress
        outputs: list[WorkerApplyOutput] = []
        loop = asyncio.get_running_loop()
        try:
            for i, batch in enumerate(batches, 1):
                if i > 1 and ends is not None and ends <= loop.time():
                    outputs += not_attempted([ep for b in batches[i - 1:] for ep in b], "the caller's deadline passed")
                    progress.phase = "stopped"
                    break
                progress.current, progress.phase = batch, "applying"
                what = f"apply {req.apply_type.value} {req.key} (batch {i}/{len(batches)})"
                done = await self._fan_out(batch, "apply", wire, what, ends)
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
            self._rollouts.pop(req.key, None)
        return outputs

    async def _probe_now(self, batch: list[Endpoint]) -> None:
        """Ask the batch's proxies to probe their workers now: the health gate
        takes only evidence that is newer than the batch's operation."""
        states = await self._each(batch, "probe_now", (), self.config.probe.timeout + 1.0, lambda ep, exc: None)
        now = asyncio.get_running_loop().time()
        for ep, state in zip(batch, states):
            if state is not None and ep in self._proxies.endpoints():
                self._record_probe(ep, state, now)
                self._reroute_endpoint(ep)
        self._tell_registries()
        self._changed()

    def _batch_healthy(self, key: str, batch: list[Endpoint], since: float) -> bool:
        """Every instance of the batch registered healthy, and found reachable
        by a probe whose word arrived after ``since`` (the batch's end): a
        snapshot from before the batch restarted proves nothing."""
        healthy = {i.endpoint for i in self._live.of_key(key) if i.healthy}
        def answered(ep: Endpoint) -> bool:  # the last probe got through, not merely "not dead yet"
            state = self._probes.get(ep)
            return state is not None and state.reachable is True and not getattr(state, "consecutive_failures", 0)

        return all(ep in healthy and self._probed_at.get(ep, -1.0) >= since and answered(ep) for ep in batch)

    async def startup(self, req: WorkerStartupRequest, timeout: float | None = None) -> WorkerApplyOutput:
        return await self._lifecycle("startup", req, timeout)

    async def shutdown(self, req: WorkerStartupRequest, timeout: float | None = None) -> WorkerApplyOutput:
        return await self._lifecycle("shutdown", req, timeout)

    async def _lifecycle(self, op: str, req: WorkerStartupRequest, timeout: float | None) -> WorkerApplyOutput:
        await self._rebuilt()

        async def operation() -> WorkerApplyOutput:
            if not self._live.has_endpoint(req.endpoint):
                self._metrics.operation(op, "error")
                raise UnknownEndpointError(req.host, req.port)
            [output] = await self._fan_out([req.endpoint], op, req, f"{op} {req.key}", ends)
            return output

        ends = _ends(timeout)
        return await self._in_turn(req.key, operation, (op, req.model_dump_json()))

    async def supports(self) -> list[SupportsOutcome]:
        """``GET /models/supports`` on every healthy, reachable worker manager."""
        await self._rebuilt()
        unreachable = self._unreachable()
        managers = self._live.of_key(WORKER_MANAGER_KEY)
        targets = [ep for ep in manager_endpoints(managers) if ep not in unreachable]
        return await self._each(
            targets, "supports", (), None,
            lambda ep, exc: SupportsOutcome(endpoint=ep, error=f"{ep}: supports failed: {exc}"),
        )

    async def _fan_out(
        self, targets: list[Endpoint], op: str, req: Any, what: str, ends: float | None = None
    ) -> list[WorkerApplyOutput]:
        """Run proxy operation ``op`` on every target: one output per target, in
        target order; a proxy failure is that target's failed output. With
        ``ends`` (the caller's deadline, loop time), every worker call ends by
        then, and none starts after it."""
        budget = None if ends is None else ends - asyncio.get_running_loop().time()
        if budget is not None and budget <= 0:
            return [WorkerApplyOutput(message=f"{ep}: {what} not sent: the caller's deadline passed before its turn",
                                      success=False, timecost=0, host=ep.host, port=ep.port) for ep in targets]
        # To the proxies as a wall-clock time: it counts the time a call takes
        # to reach its proxy (one that is still starting, say).
        deadline_at = None if budget is None else time.time() + budget
        outputs = await self._each(
            targets, op, (req, deadline_at), budget,
            lambda ep, exc: WorkerApplyOutput(
                message=f"{ep}: {what} failed: {exc}", success=False, timecost=-1, host=ep.host, port=ep.port
            ),
        )
        for o in outputs:
            if o.timecost is not None and o.timecost >= 0:
                self._metrics.instance_latency(op, o.timecost)
        self._metrics.operation(op, "success" if all(o.success for o in outputs) else "failure")
        return outputs

    async def _each(
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
        t = self.config.timeouts
        return t.for_operation(op) + 3 * t.connect + PROXY_MARGIN


def _describe_status(st: DeploymentStatus) -> str:
    return f"{st.state}, {st.ready} of {st.replicas} ready" + (f": {st.last_error}" if st.last_error else "")


class _Fleet:
    """The service as the deployment keeper sees it (:class:`coordinator.keeper.Fleet`):
    its actions go through the same proxies, per-model turns and rolling path
    as a driver's."""

    def __init__(self, service: CoordinatorService) -> None:
        self._s = service

    def observe(self, key: str) -> tuple[list[Seen], list[Manager]]:
        return self._s._observe(key)

    async def rebuilt(self) -> None:
        await self._s._rebuilt()

    async def in_turn(self, key: str, start: Callable[[], Awaitable[T]], same: tuple[str, ...]) -> T:
        return await self._s._in_turn(key, start, same)

    def changed(self) -> None:
        self._s._feed.notify()

    async def _one(self, ep: Endpoint, op: str, req: Any, what: str) -> WorkerApplyOutput:
        if not self._s._live.has_endpoint(ep):  # left the registries meanwhile: no proxy to ask
            return WorkerApplyOutput(message=f"{ep}: {what} not sent: no registry lists it any more",
                                     success=False, timecost=0, host=ep.host, port=ep.port)
        [output] = await self._s._fan_out([ep], op, req, what)
        return output

    async def start(self, ep: Endpoint, spec: Deployment) -> WorkerApplyOutput:
        # DB-GPT builds the model's config from params, name included: default it to the model.
        req = WorkerStartupRequest(host=ep.host, port=ep.port, model=spec.model, worker_type=spec.worker_type,
                                   params={"name": spec.model, **spec.params})
        return await self._one(ep, "startup", req, f"startup {spec.key}")

    async def stop(self, ep: Endpoint, spec: Deployment) -> WorkerApplyOutput:
        req = WorkerStartupRequest(host=ep.host, port=ep.port, model=spec.model, worker_type=spec.worker_type)
        return await self._one(ep, "shutdown", req, f"shutdown {spec.key}")

    async def apply_one(self, ep: Endpoint, spec: Deployment, apply_type: ApplyType) -> WorkerApplyOutput:
        req = WorkerApplyRequest(model=spec.model, worker_type=spec.worker_type, apply_type=apply_type)
        return await self._one(ep, "apply", req.model_dump_json(), f"apply {apply_type.value} {spec.key}")

    async def roll(self, spec: Deployment) -> list[WorkerApplyOutput]:
        req = WorkerApplyRequest(model=spec.model, worker_type=spec.worker_type,
                                 apply_type=ApplyType.UPDATE_PARAMS, params=spec.params)
        targets = sorted(s.endpoint for s in self._s._observe(spec.key)[0] if s.ready)
        batches = plan_batches(targets, spec.max_unavailable)
        return await self._s._roll(req, req.model_dump_json(), batches, self._s.config.timeouts.rollout_health)
