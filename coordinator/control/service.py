"""The coordinator, as a plain asyncio object that holds its rooms.

- :class:`~coordinator.control.fleet_view.FleetView` — what it knows: the live set,
  the probes' verdicts, the route table, what the registries were told;
- :class:`~coordinator.control.operations.Operations` — what it does to workers:
  per-model turns, fan-out through the proxies, rollouts;
- :class:`~coordinator.control.keeper.Keeper` — the deployments it keeps;
- :class:`~coordinator.core.supervisor.Supervisor` — its background loops
  (following each watcher, resync, gauges, the keeper), each restarted after
  an unexpected failure, and the process ended when one cannot be.

This class wires them together and answers the calls of the RPC face
(:class:`coordinator.control.actor.CoordinatorActor`). It talks to watchers, proxies
and registries only through the links it is given (the Ray ones live in
``coordinator.control.ray_links``; tests pass in-process fakes).

Its state is soft: after a restart it is rebuilt from the watchers.

Why this module is long: it is the one place the rooms meet — each RPC's
entry (waiting for the first answers after a restart, then the room that
answers it), the supervised loops that feed them, and the keeper's view of
the coordinator (:class:`_Fleet`), which must go through the same rooms as
a driver's calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from actors.registry_state import MemoryStateStore
from coordinator.core.changes import Change
from coordinator.core.config import CoordinatorConfig
from coordinator.core.deployments import Decision, Deployment, DeploymentStatus, Manager, Seen
from coordinator.core.errors import DeploymentNotReadyError, WaitTimeoutError
from coordinator.core.fleet_page import fleet_snapshot
from coordinator.control.fleet_view import FleetView, LinkError, ProxyLink, Reachability, RegistryLink
from coordinator.control.keeper import Keeper, Store
from coordinator.core.longpoll import ChangeFeed
from coordinator.plumbing.metrics import Metrics, NoMetrics
from coordinator.core.naming import deployments_key
from coordinator.core.models import (
    ApplyResult,
    ApplyType,
    Endpoint,
    ModelInstance,
    SupportsOutcome,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
    worker_key,
)
from coordinator.control.operations import Call, Drain, Operations
from coordinator.core.rollout import ApplyOptions, ApplyPlan, plan_batches
from coordinator.core.status import ClusterStatus, WatcherStatus
from coordinator.core.supervisor import Supervisor

__all__ = ["CoordinatorService", "LinkError", "ProxyLink", "RegistryLink", "WatcherLink"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between re-recordings of the live-instance gauges when nothing changed.
GAUGE_REFRESH = 5.0
#: At most this often after a change.
GAUGE_INTERVAL = 1.0
#: Seconds a call made right after a (re)start waits for the watchers' first
#: answers before it reads the live set.
REBUILD_WAIT = 15.0
#: Seconds between two decisions a model at zero gets from its callers'
#: reports (between the autoscaler's own once-a-second samples).
FROM_ZERO_EVERY = 1.0


class WatcherLink(Protocol):
    async def listen(self, source: str, since: tuple[str, int] | None, timeout: float) -> Change | None: ...

    async def status(self, source: str) -> WatcherStatus: ...


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
        on_fatal: Callable[[str, BaseException], None] | None = None,
        restarted: bool = False,
    ) -> None:
        self.config = config
        self.name, self.namespace = name, namespace
        self._metrics = metrics or NoMetrics()
        self._watchers = watchers
        self._proxies = proxies
        self._feed = ChangeFeed()
        #: Woken by load reports only: what a drain waits on. Not ``_feed``,
        #: which every parked route-table poll waits on — reports arrive many
        #: times a second while requests end.
        self._load_feed = ChangeFeed()
        self._zero_asked: dict[str, float] = {}  # model@type -> when its reports last asked from zero
        self._rebuild_by: float | None = None  # loop time until which reads wait for the first answers
        #: Where the fleet page serves, once it does (set by the actor that serves it).
        self.page_url: str | None = None
        self.view = FleetView(config, proxies, registries, self._metrics, on_change=self._changed)
        # Restarted, it has not heard from the callers yet: drains wait a
        # report_ttl for them (a fresh coordinator has no callers from before).
        self.operations = Operations(config, self.view, proxies, self._metrics, self._feed,
                                     load_feed=self._load_feed,
                                     hear_callers_for=config.caller.report_ttl if restarted else 0.0)
        probe = config.probe
        self.keeper = Keeper(
            _Fleet(self), store or MemoryStateStore(), deployments_key(name, namespace), config.reconcile,
            startup_timeout=config.timeouts.startup, metrics=self._metrics,
            # the first round waits until a dead worker's probes have had time to say so
            settle=probe.interval * probe.failures_to_dead + probe.timeout if probe.enabled else 0.0,
        )
        self.supervisor = Supervisor(on_restart=self._metrics.loop_restart, on_fatal=on_fatal)
        for source in self.view.sources:
            self.supervisor.add(f"follow {source}", lambda source=source: self._follow(source))
        self.supervisor.add("resync", self._resync)
        self.supervisor.add("gauges", self._republish_gauges)
        self.supervisor.add("deployments", self._keep)

    # ---- the loops ------------------------------------------------------

    async def run(self) -> None:
        """Run every background loop, supervised, until cancelled."""
        await self.supervisor.run()

    async def _keep(self) -> None:
        failures = 0
        while not self.keeper.loaded:  # once: a restart of this loop must not reload the records
            try:
                await self.keeper.load(self.config.deployments)
                break
            except Exception:  # the GCS unreachable: keep following, try again
                failures += 1
                log.exception("loading the kept deployments failed")
                await asyncio.sleep(self.config.backoff.delay(failures))
        await self.keeper.run()

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
            failures = 0
            if change is None:
                continue
            since = (change.epoch, change.version)
            self.view.absorb(source, change)
            if self.config.change_pace:
                await asyncio.sleep(self.config.change_pace)  # a burst shares the next delta

    async def _resync(self) -> None:
        """Every few seconds, repair any drift between the live set and the
        proxies (:meth:`FleetView.repair`)."""
        while True:
            await asyncio.sleep(self.config.resync_interval)
            self.view.repair()

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
                quiet = 0.0
                self.view.record_gauges(everything=True)
                for key, depth in self.operations.depths().items():  # a gauge not re-reported ages out
                    self._metrics.queued_operations(key, depth)
            else:
                self.view.record_gauges(everything=False)
            if self.view.ready() and self.keeper.loaded:
                self.keeper.autoscale(self.view.load_by_model())

    def _changed(self) -> None:
        self._feed.notify()
        self.keeper.poke()

    # ---- readiness ------------------------------------------------------

    async def ready(self, timeout: float) -> bool:
        """Whether every watcher has delivered its first snapshot within ``timeout``."""
        return await self._feed.wait_until(self.view.ready, timeout)

    async def _rebuilt(self) -> None:
        """Before an answer that reads the live set: right after a (re)start it
        is empty until the watchers have answered, and "no registry lists it"
        would be false. Waits (bounded) for every watcher's first answer."""
        if self.view.ready():
            return
        # Once per (re)start, shared by every call: a source that stays down
        # must not make each read wait again.
        loop = asyncio.get_running_loop()
        if self._rebuild_by is None:
            self._rebuild_by = loop.time() + REBUILD_WAIT
        if (left := self._rebuild_by - loop.time()) > 0:
            await self.ready(left)

    # ---- what proxies tell ----------------------------------------------

    async def report_probe(self, endpoint: Endpoint, state: Reachability) -> None:
        """A proxy says its worker became reachable or unreachable."""
        endpoint = Endpoint(*endpoint)
        if self.view.report_probe(endpoint, state):
            log.info("%s is now %s", endpoint, "reachable" if state.reachable else f"unreachable ({state.last_error})")

    # ---- the route table ------------------------------------------------

    async def routes_since(self, since: tuple[str, int] | None, timeout: float) -> Change | None:
        """Long poll of the route table: what changed since ``since`` (a
        :class:`Delta`, or a :class:`Snapshot` for a caller that is new or too
        far behind) as soon as anything did; None after ``timeout`` seconds of
        nothing. Callers keep their own copy and choose instances locally."""
        await self._rebuilt()
        routes = self.view.routes
        if not await self._feed.wait_until(lambda: since != routes.position, timeout):
            return None
        return routes.since(since)

    # ---- reads ----------------------------------------------------------

    async def instances(
        self, model: str | None = None, worker_type: str | None = None, healthy_only: bool = True
    ) -> list[ModelInstance]:
        await self._rebuilt()
        return self.view.select(model, worker_type, healthy_only)

    async def wait_for(
        self, model: str, count: int, worker_type: str = "llm", timeout: float = 60.0
    ) -> list[ModelInstance]:
        """Wait until at least ``count`` healthy instances of the model are live."""

        def found() -> list[ModelInstance]:
            return self.view.select(model, worker_type, True)

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
            tasks = [tg.create_task(watcher_status(s)) for s in self.view.sources]
        return ClusterStatus(
            name=self.name, namespace=self.namespace, instances=self.view.instance_rows(),
            watchers=[t.result() for t in tasks], proxies=len(self._proxies.endpoints()),
            busy_keys=self.operations.busy_keys(), queued=self.operations.depths(),
            rollouts=list(self.operations.rollouts.values()), loops=self.supervisor.states(),
            load_reporters=self.view.load.reporters(self.view.now()),
            waiting=self.view.load.queued(self.view.now()), page_url=self.page_url,
        )

    async def page_snapshot(self) -> dict[str, Any]:
        """What the fleet page shows (:func:`coordinator.core.fleet_page.fleet_snapshot`)."""
        status = await self.status()
        return fleet_snapshot(status, self.keeper.statuses() if self.keeper.loaded else [], time.time())

    async def fleet_changed(self, timeout: float) -> bool:
        """Return True at the fleet's next change (the live set, probes, routes,
        operations, deployments), False after ``timeout`` seconds."""
        return await self._feed.next(timeout)

    # ---- load -----------------------------------------------------------

    def report_load(self, reporter: str, seq: int, counts: dict[tuple[str, str, int], int],
                    gone: bool = False, applied: tuple[str, int] | None = None,
                    queued: dict[str, int] | None = None) -> dict[tuple[str, str, int], int]:
        """A caller's requests in flight per instance (its whole count) and the
        route table it has applied; what the other callers have in flight,
        for its choices. ``gone``: it stopped, and counts for nothing any more."""
        if gone:
            self.view.forget_reporter(reporter)
            others: dict[tuple[str, str, int], int] = {}
        else:
            others = self.view.report_load(reporter, seq, counts, applied, queued)
            if queued:
                self._from_zero(queued)
        if self.view.draining():  # a drain waits on these counts
            self._load_feed.notify()
        return others

    def _from_zero(self, queued: dict[str, int]) -> None:
        """Requests held for a model at zero (``queued``: at least that many
        each): its count is decided now, not at the next of the autoscaler's
        once-a-second samples — that model only, at most once a second (its
        other samples keep their pace)."""
        if not (self.keeper.loaded and self.view.ready()):
            return
        now = self.view.now()
        due = [key for key in queued if self.keeper.wanted_from_zero([key])
               and now - self._zero_asked.get(key, -FROM_ZERO_EVERY) >= FROM_ZERO_EVERY]
        if due:
            self._zero_asked = {k: t for k, t in self._zero_asked.items() if now - t < FROM_ZERO_EVERY}
            self._zero_asked.update(dict.fromkeys(due, now))
            load = self.view.load_by_model()
            for key in due:  # a caller's report may not have counted them yet
                load[key] = max(load.get(key, 0.0), float(queued[key]))
            self.keeper.autoscale(load, keys=due)

    def hold_for(self, key: str) -> float:
        """Seconds a caller should hold a request for ``key`` when it has no
        instance: the deployment's ``autoscale.from_zero_timeout_s`` when it
        scales from zero (its load then starts one), else 0 (fail at once).
        Asked because a request is about to be held: for a deployment at
        zero, that request is the demand, decided on now (a caller's first
        load report — a new process's first call on another thread — can take
        most of a second to arrive)."""
        wait = self.keeper.hold_for(key)
        if wait > 0:
            self._from_zero({key: 1})
        return wait

    # ---- operations -----------------------------------------------------

    async def apply(self, req: WorkerApplyRequest, options: ApplyOptions | None = None) -> ApplyResult | ApplyPlan:
        """Apply to every registered instance of the model, healthy or not: all
        at once, or in batches of ``options.max_unavailable`` with a health gate
        between them; with ``options.dry_run``, only say what would be done —
        a read, answered from the live set at once, never queued behind the
        model's operations."""
        await self._rebuilt()
        return await self.operations.apply(req, options or ApplyOptions(apply_type=req.apply_type))

    async def startup(self, req: WorkerStartupRequest, timeout: float | None = None) -> WorkerApplyOutput:
        await self._rebuilt()
        return await self.operations.lifecycle("startup", req, timeout)

    async def shutdown(self, req: WorkerStartupRequest, timeout: float | None = None,
                       drain_timeout: float | None = None) -> WorkerApplyOutput:
        await self._rebuilt()
        return await self.operations.lifecycle("shutdown", req, timeout, drain_timeout)

    async def supports(self) -> list[SupportsOutcome]:
        await self._rebuilt()
        return await self.operations.supports()

    # ---- deployments ----------------------------------------------------

    async def deploy(self, specs: list[Deployment], wait: bool = False, timeout: float | None = None) -> list[int]:
        """Create or replace desired states; their generations. With ``wait``,
        until each is ready at that generation — or raise, with its status, at
        the deadline, or at once when a round finds the deployment cannot be
        placed (no eligible worker manager: waiting would not help)."""
        generations = await self.keeper.deploy(specs)
        if not wait:
            return generations
        keys = [s.key for s in specs]

        def settled() -> bool:
            observed = [(st, g) for st, g in zip((self.keeper.status(k) for k in keys), generations)
                        if st.observed_generation >= g]
            return len(observed) == len(keys) and all(st.state == "ready" for st, _ in observed) or any(
                st.stuck for st, _ in observed)

        await self._feed.wait_until(settled, timeout or self.config.timeouts.startup)
        statuses = [self.keeper.status(k) for k in keys]
        late = [st for st, g in zip(statuses, generations) if st.state != "ready" or st.observed_generation < g]
        if late:
            first = next((st for st in late if st.stuck), late[0])
            raise DeploymentNotReadyError(first.key, _describe_status(first))
        return generations

    async def undeploy(self, key: str, shutdown: bool = False) -> DeploymentStatus:
        return await self.keeper.undeploy(key, shutdown)

    async def deployments(self) -> list[DeploymentStatus]:
        await self._rebuilt()
        return self.keeper.statuses()

    async def plan_deploy(self, specs: list[Deployment]) -> list[tuple[str, Decision]]:
        """What a round would do for each spec now; nothing is sent or kept."""
        await self._rebuilt()
        return self.keeper.plan(specs)

    def deployed(self, key: str) -> Deployment | None:
        return self.keeper.spec(key)

    async def forget(self) -> None:
        """Remove the kept deployments (a coordinator stopped for good)."""
        await self.keeper.forget()


def _describe_status(st: DeploymentStatus) -> str:
    return f"{st.state}, {st.ready} of {st.replicas} ready" + (f": {st.last_error}" if st.last_error else "")


class _Fleet:
    """The coordinator as the deployment keeper sees it (:class:`coordinator.control.keeper.Fleet`):
    its actions go through the same proxies, per-model turns and rolling path
    as a driver's, through the rooms' public methods."""

    def __init__(self, service: CoordinatorService) -> None:
        self._s = service

    def observe(self, key: str) -> tuple[list[Seen], list[Manager]]:
        return self._s.view.observe(key)

    def operating(self, key: str) -> frozenset[Endpoint]:
        return self._s.operations.operating(key)

    async def rebuilt(self) -> None:
        await self._s._rebuilt()

    async def in_turn(self, key: str, start: Callable[[], Awaitable[T]], same: tuple[str, ...]) -> T:
        return await self._s.operations.in_turn(key, start, same)

    def changed(self) -> None:
        self._s._feed.notify()

    @staticmethod
    def _unlisted(ep: Endpoint, what: str) -> WorkerApplyOutput:
        """It left the registries meanwhile: no proxy to ask."""
        return WorkerApplyOutput(message=f"{ep}: {what} not sent: no registry lists it any more",
                                 success=False, timecost=0, host=ep.host, port=ep.port)

    async def _one(self, ep: Endpoint, op: str, req: Any, what: str, key: str, kind: str,
                   drain: Drain | None = None) -> WorkerApplyOutput:
        if not self._s.view.live.has_endpoint(ep):
            return self._unlisted(ep, what)
        # Under the model's key, as a driver's operation: what it leaves behind
        # (an instance coming back, or one stopped) is known the same way —
        # a stop clears the "coming back" a driver's earlier restart left.
        [output] = await self._s.operations.fan_out([ep], op, req, what, key=key, kind=kind, drain=drain)
        return output

    async def start(self, ep: Endpoint, spec: Deployment) -> WorkerApplyOutput:
        # DB-GPT builds the model's config from params, name included: default it to the model.
        req = WorkerStartupRequest(host=ep.host, port=ep.port, model=spec.model, worker_type=spec.worker_type,
                                   params={"name": spec.model, **spec.params})
        return await self._one(ep, "startup", req, f"startup {spec.key}", spec.key, "startup")

    async def stop(self, ep: Endpoint, spec: Deployment) -> tuple[WorkerApplyOutput, WorkerApplyOutput | None]:
        what = f"shutdown {spec.key}"
        if not self._s.view.live.has_endpoint(ep):
            return self._unlisted(ep, what), None
        req = WorkerStartupRequest(host=ep.host, port=ep.port, model=spec.model, worker_type=spec.worker_type)
        stop = WorkerApplyRequest(model=spec.model, worker_type=spec.worker_type, apply_type=ApplyType.STOP)
        # One drain for both: the instance stays out of service between them.
        return await self._s.operations.one_or_else(
            ep, Call("shutdown", req, what), Call("apply", stop.model_dump_json(), f"apply stop {spec.key}"),
            spec.key, "shutdown", self._s.operations.drain_for(spec.key, "shutdown"))

    async def apply_one(self, ep: Endpoint, spec: Deployment, apply_type: ApplyType) -> WorkerApplyOutput:
        req = WorkerApplyRequest(model=spec.model, worker_type=spec.worker_type, apply_type=apply_type)
        return await self._one(ep, "apply", req.model_dump_json(), f"apply {apply_type.value} {spec.key}",
                               spec.key, apply_type.value, self._s.operations.drain_for(spec.key, apply_type.value))

    async def roll(self, spec: Deployment) -> list[WorkerApplyOutput]:
        req = WorkerApplyRequest(model=spec.model, worker_type=spec.worker_type,
                                 apply_type=ApplyType.UPDATE_PARAMS, params=spec.params)
        targets = sorted(s.endpoint for s in self._s.view.observe(spec.key)[0] if s.ready)
        batches = plan_batches(targets, spec.max_unavailable)
        return await self._s.operations.roll(req, req.model_dump_json(), batches,
                                             self._s.config.timeouts.rollout_health)
