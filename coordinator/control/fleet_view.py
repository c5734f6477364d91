"""The coordinator's view of the fleet: the one owner of what it knows.

Synchronous, no I/O of its own. It holds

- the **live set** — every watcher's changes merged (:class:`LiveSet`);
- the **probes' verdicts** — what each proxy last found about its worker, since
  when an endpoint has been unreachable, and whether its death is certain
  (connection refused: the host answers, nothing listens);
- the **route table** — where requests may go, for callers to follow;
- what the **embedded registries** were last told about unreachable endpoints;
- the **load** — requests in flight per instance, as the callers' routers
  report them (:class:`LoadBook`);
- which instances are **draining** — out of the route table and listed
  unhealthy by the embedded registries while an operation waits for their
  requests to end;
- which live-instance gauges are out of date.

Every change goes through one of its methods, which keeps these consistent
and then calls ``on_change`` (the service wakes long polls and the keeper).
It starts and retires proxies through the :class:`ProxyLink` it is given, and
tells the registries through the :class:`RegistryLink`.

Why this module is long: the route table is one decision over all of the
above — an instance is routable when it is listed healthy, its endpoint is
found reachable, it is not draining and not just stopped — so each of them
lives beside the others, behind the one set of methods that keeps them
consistent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from coordinator.core.changes import Change, ChangeLog, Snapshot
from coordinator.core.config import CoordinatorConfig, WorkerAccess
from coordinator.core.deployments import Manager, Seen
from coordinator.core.inference import Route, route_identity
from coordinator.core.liveset import LiveSet, as_listed, filter_instances
from coordinator.core.load import Instance, LoadBook
from coordinator.plumbing.metrics import Metrics, live_counts
from coordinator.core.models import WORKER_MANAGER_KEY, Endpoint, ModelInstance, parse_worker_key, worker_key
from coordinator.core.status import InstanceStatus

log = logging.getLogger(__name__)

#: Seconds after an endpoint answers again during which the registry's
#: "unhealthy" is taken for the outage's tail (a registry whose heartbeat
#: timeout passed during it lists the worker healthy at its next heartbeat):
#: its instances are still shown as within their outage. Past this, an
#: unhealthy listing is the registry's own word (a model that did not come
#: back with its worker). The embedded registry's feed never echoes the
#: probes' verdict (actors/registry_store.py).
ECHO_WINDOW = 5.0
#: Seconds an instance an operation stopped stays out of the route table while
#: its registry still lists it healthy (a polled DB-GPT controller catches up
#: at its next poll): never routed to after its stop answered.
STOPPED_HOLD = 30.0


class LinkError(Exception):
    """A watcher or proxy could not be reached (dead, restarting, too slow)."""


class ProxyLink(Protocol):
    def endpoints(self) -> set[Endpoint]: ...

    def ensure(self, endpoint: Endpoint, access: WorkerAccess) -> None: ...

    def retire(self, endpoint: Endpoint) -> None: ...

    async def call(self, endpoint: Endpoint, method: str, *args: Any, deadline: float) -> Any:
        """Run ``method`` on the endpoint's proxy; raise :class:`LinkError` when the
        proxy itself failed (it never raises for the worker's failures)."""
        ...


class RegistryLink(Protocol):
    def tell(self, unreachable: frozenset[Endpoint], draining: frozenset[Instance] = frozenset()) -> None:
        """Tell the embedded registries which endpoints the probes find
        unreachable and which instances are draining (listed unhealthy)."""
        ...

    async def quiet_for(self, instances: list[Instance]) -> float | None:
        """Seconds since a registry last listed any of ``instances`` healthy to
        a reader (None: none did; 0.0 when a registry cannot say)."""
        ...

    @property
    def present(self) -> bool:
        """Whether there are embedded registries (readers that report nothing)."""
        ...


class NoRegistries:
    present = False

    def tell(self, unreachable: frozenset[Endpoint], draining: frozenset[Instance] = frozenset()) -> None:
        pass

    async def quiet_for(self, instances: list[Instance]) -> float | None:
        return None


class Reachability(Protocol):
    reachable: bool | None
    last_error: str | None


class FleetView:
    def __init__(
        self,
        config: CoordinatorConfig,
        proxies: ProxyLink,
        registries: RegistryLink | None = None,
        metrics: Metrics | None = None,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from coordinator.plumbing.metrics import NoMetrics

        self._config = config
        self._proxies = proxies
        self._registries = registries or NoRegistries()
        self._metrics = metrics or NoMetrics()
        self._on_change = on_change
        self._clock = clock
        self.sources = [s.name for s in config.registries]
        self.heard: set[str] = set()  # sources whose watcher has answered once
        self.live = LiveSet(self.sources)
        # What the embedded registries were last told (None: nothing yet, so
        # the first word goes out even if empty: a registry may hold an old one).
        self._told: tuple[frozenset[Endpoint], frozenset[Instance]] | None = None
        #: Instances being drained -> how many operations drain them now.
        self._draining: dict[Instance, int] = {}
        #: Instances an operation stopped -> until when they stay out of the
        #: route table unless their registry says they are gone or unhealthy.
        self._stopped: dict[Instance, float] = {}
        self._gauge_keys: set[str] = set()  # worker keys whose gauges are out of date
        self._probes: dict[Endpoint, Reachability] = {}
        self._probed_at: dict[Endpoint, float] = {}  # when that word arrived (loop time)
        self._down: dict[Endpoint, float] = {}  # unreachable endpoints -> since when (unix time)
        #: Endpoints that answer again after an outage -> (when it began, when
        #: it ended), kept for reconcile.replace_after: down again within that
        #: time is the same outage (flapping never restarts the wait).
        self._revived: dict[Endpoint, tuple[float, float]] = {}
        #: Where requests may go, for callers to follow.
        self.routes: ChangeLog[tuple[str, str, int], Route] = ChangeLog(route_identity)
        #: Requests in flight per instance, summed over the callers that report.
        self.load = LoadBook(config.caller.report_ttl)
        self._loaded: dict[str, int] = {}  # the in-flight gauge's last values, per model
        self._drained_gauge: dict[str, int] = {}  # the draining gauge's last values, per model
        self._waiting_gauge: dict[str, int] = {}  # the waiting gauge's last values, per model

    # ---- changes --------------------------------------------------------

    def absorb(self, source: str, change: Change) -> None:
        """One watcher's change into the live set; proxies follow the endpoints
        it touched. Costs what the change carries."""
        self.heard.add(source)
        if isinstance(change, Snapshot):
            # A registry new to this watcher, or restarted: it may not know what
            # is unreachable or draining (that word is not saved). Tell it now,
            # not at the next resync.
            self.tell_registries(always=True)
        absorbed = self.live.absorb(source, change)
        self._gauge_keys |= absorbed.keys
        self._reroute(absorbed.identities)
        for ep in sorted(absorbed.endpoints):
            if self.live.has_endpoint(ep) and ep not in self._proxies.endpoints():
                self._ensure_proxy(ep)
            elif not self.live.has_endpoint(ep) and ep in self._proxies.endpoints():
                self._retire_proxy(ep)
        self._on_change()

    def report_probe(self, endpoint: Endpoint, state: Reachability, at: float | None = None,
                     notify: bool = True) -> bool:
        """A proxy's word on its worker; False if that proxy is not ours (any more)."""
        if endpoint not in self._proxies.endpoints():
            return False
        self._record_probe(endpoint, state, at)
        self._gauge_keys |= self.live.keys_at(endpoint)
        self._reroute_endpoint(endpoint)
        self.tell_registries()
        if notify:
            self._on_change()
        return True

    def changed(self) -> None:
        self._on_change()

    def report_load(self, reporter: str, seq: int, counts: dict[Instance, int],
                    applied: tuple[str, int] | None = None, queued: dict[str, int] | None = None,
                    ) -> dict[Instance, int]:
        """A caller's whole count of its requests in flight, and the route
        table it has applied; what every other caller has in flight, per
        instance (for its choices)."""
        now = self._clock()
        self.load.report(reporter, seq, counts, now, applied, queued)
        return self.load.others(reporter, now)

    def now(self) -> float:
        return self._clock()

    def forget_reporter(self, reporter: str) -> None:
        """A caller stopped: its requests count for nothing any more."""
        self.load.forget(reporter)

    def load_by_model(self) -> dict[str, float]:
        """Requests in flight, and waiting (held for an instance, or queued by
        flow control), per model@type, over every caller that reports."""
        return {k: float(n) for k, n in self.load.by_model(self._clock()).items()}

    def in_flight(self, instance: Instance) -> int:
        """Requests in flight on ``instance`` over every caller that reports."""
        return self.load.on(instance, self._clock())

    def repair(self) -> None:
        """Repair drift between the live set and the proxies: a proxy for every
        live endpoint (a lost one is started again), none for an endpoint that
        left; and tell the registries again."""
        self.tell_registries(always=True)
        live, have = self.live.endpoints(), self._proxies.endpoints()
        for ep in sorted(live):
            if ep not in have:
                log.warning("resync: %s had no proxy; starting one", ep)
            self._ensure_proxy(ep)
        for ep in sorted(have - live):
            log.warning("resync: %s left the registries but kept its proxy; retiring it", ep)
            self._retire_proxy(ep)

    def tell_registries(self, always: bool = False) -> None:
        """The embedded registries list instances at unreachable endpoints, and
        draining ones, as unhealthy: tell them when either set changes (and at
        every resync)."""
        word = (self.unreachable(), frozenset(self._draining))
        if always or word != self._told:
            self._told = word
            self._registries.tell(*word)

    # ---- draining -------------------------------------------------------

    def drain(self, instances: Iterable[Instance]) -> None:
        """Take ``instances`` out of the route table and have the registries
        list them unhealthy, until :meth:`undrain` (counted: two operations
        draining one instance keep it drained until both are done)."""
        instances = list(instances)
        for i in instances:
            self._draining[i] = self._draining.get(i, 0) + 1
        self._reroute(instances)
        self._gauge_keys |= {i[0] for i in instances}
        self.tell_registries()
        self._on_change()

    def undrain(self, instances: Iterable[Instance], stopped: Iterable[Instance] = ()) -> None:
        """The drain of ``instances`` is over; those in ``stopped`` were stopped
        by it, and stay out of the route table until their registry shows it
        (at most STOPPED_HOLD)."""
        instances = list(instances)
        until = self._clock() + STOPPED_HOLD
        for i in stopped:
            self._stopped[i] = until
        for i in instances:
            left = self._draining.get(i, 0) - 1
            if left > 0:
                self._draining[i] = left
            else:
                self._draining.pop(i, None)
        self._reroute(instances)
        self._gauge_keys |= {i[0] for i in instances}
        self.tell_registries()
        self._on_change()

    def draining(self) -> frozenset[Instance]:
        return frozenset(self._draining)

    def started(self, instances: Iterable[Instance]) -> None:
        """An operation started (or restarted) ``instances``: routable again as
        soon as their registry lists them healthy."""
        instances = [i for i in instances if self._stopped.pop(i, None) is not None]
        if instances:
            self._reroute(instances)
            self._on_change()

    def settled(self, instances: Iterable[Instance], mark: tuple[str, int]) -> tuple[int, int]:
        """(requests in flight on ``instances``, callers that have not applied
        the route table at ``mark`` yet) — a drain is over when both are 0."""
        now = self._clock()
        return sum(self.load.on(i, now) for i in instances), len(self.load.behind(mark, now))

    @property
    def registries(self) -> RegistryLink:
        return self._registries

    def _ensure_proxy(self, ep: Endpoint) -> None:
        self._proxies.ensure(ep, self._config.access_for(ep, self.live.listed_by(ep)))

    def _retire_proxy(self, ep: Endpoint) -> None:
        self._proxies.retire(ep)
        self._probes.pop(ep, None)
        self._down.pop(ep, None)
        self._revived.pop(ep, None)
        self._probed_at.pop(ep, None)
        self._reroute_endpoint(ep)
        self.tell_registries()

    def _record_probe(self, ep: Endpoint, state: Reachability, at: float | None = None) -> None:
        self._probes[ep] = state
        self._probed_at[ep] = asyncio.get_running_loop().time() if at is None else at
        now = self._clock()
        for old in [e for e, (_, back) in self._revived.items() if now - back > self._config.reconcile.replace_after]:
            del self._revived[old]  # long enough ago: that outage is over
        if state.reachable is False:
            # Down again soon after it came back: the same outage goes on.
            revived = self._revived.pop(ep, None)
            self._down.setdefault(ep, revived[0] if revived is not None else now)
        elif ep in self._down:
            self._revived[ep] = (self._down.pop(ep), now)

    # ---- the route table -------------------------------------------------

    def _reroute(self, identities: Iterable[tuple[str, str, int]]) -> None:
        """Bring the route table's entries for ``identities`` up to date: an
        entry is a route while it is listed healthy, enabled, and its endpoint
        is not found unreachable. Costs what changed."""
        now = self._clock()
        for ident in identities:
            inst = self.live.merged.get(ident)
            if inst is None or not inst.healthy:
                self._stopped.pop(ident, None)  # the registry shows the stop: nothing to hold
            held = self._stopped.get(ident, 0.0) > now
            if (inst is None or not inst.healthy or inst.enabled is False or inst.endpoint in self._down
                    or inst.model_name == WORKER_MANAGER_KEY or ident in self._draining or held):
                self.routes.remove(ident)
            else:
                self.routes.put(Route(inst.model_name, inst.host, inst.port, float(inst.weight or 0.0),
                                      tuple(self.live.listed_by(inst.endpoint))))

    def _reroute_endpoint(self, ep: Endpoint) -> None:
        """After the probes' verdict on ``ep`` changed (entries that left the
        live set were rerouted as they left)."""
        self._reroute({i.identity for i in self.live.at(ep)})

    # ---- reads ----------------------------------------------------------

    def ready(self) -> bool:
        """Whether every watcher has answered once."""
        return len(self.heard) == len(self.sources)

    def unreachable(self) -> frozenset[Endpoint]:
        """The endpoints the probes find unreachable (kept as they report, so
        this costs what is down, not the fleet)."""
        return frozenset(self._down)

    def probe(self, ep: Endpoint) -> Reachability | None:
        return self._probes.get(ep)

    def answered_since(self, ep: Endpoint, since: float) -> bool:
        """The last probe of ``ep`` got through (not merely "not dead yet") and
        its word arrived after ``since`` (loop time)."""
        state = self._probes.get(ep)
        return (state is not None and state.reachable is True and not getattr(state, "consecutive_failures", 0)
                and self._probed_at.get(ep, -1.0) >= since)

    def select(self, model: str | None, worker_type: str | None, healthy_only: bool) -> list[ModelInstance]:
        """The instances asked for, sorted; one key's instances only when the
        key is known (no scan of the fleet)."""
        live = self.live.of_key(worker_key(model, worker_type)) if model and worker_type else self.live.instances()
        # As the embedded registry lists them to DB-GPT's servers (its feed
        # here carries each entry's own state).
        shown = (as_listed(i, self._down, self._draining) for i in live)
        return sorted(filter_instances(shown, model, worker_type, healthy_only), key=lambda i: i.identity)

    def observe(self, key: str) -> tuple[list[Seen], list[Manager]]:
        """A deployment's view: its model's instances (with the probes' verdict,
        since when they are unreachable and whether that is certain), and every
        worker manager with the models it runs."""

        def reach(ep: Endpoint) -> bool | None:
            state = self._probes.get(ep)
            return None if state is None else state.reachable

        def seen(i: ModelInstance) -> Seen:
            state = self._probes.get(i.endpoint)
            since = self._down.get(i.endpoint)
            revived = self._revived.get(i.endpoint)
            if since is None and revived is not None and self._clock() - revived[1] < ECHO_WINDOW:
                since = revived[0]  # answers again; the registry may not have caught up yet
            return Seen(i.endpoint, bool(i.healthy), reach(i.endpoint), down_since=since,
                        refused=bool(getattr(state, "refused", False)))

        managers = [
            Manager(m.endpoint, bool(m.healthy) and reach(m.endpoint) is not False,
                    sum(1 for i in self.live.at(m.endpoint) if i.healthy and i.model_name != WORKER_MANAGER_KEY))
            for m in self.live.of_key(WORKER_MANAGER_KEY)
        ]
        return sorted(seen(i) for i in self.live.of_key(key)), sorted(managers)

    def instance_rows(self) -> list[InstanceStatus]:
        rows = []
        load = self.load.in_flight(self._clock())
        for inst in self.live.instances():
            name, wtype = parse_worker_key(inst.model_name)
            probe = self._probes.get(inst.endpoint)
            rows.append(InstanceStatus(
                model=name, worker_type=wtype, host=inst.host, port=inst.port,
                registry_healthy=bool(inst.healthy),
                reachable=probe.reachable if probe else None,
                probe_error=probe.last_error if probe and probe.reachable is False else None,
                last_heartbeat=inst.last_heartbeat,
                in_flight=load.get((inst.model_name, inst.host, inst.port), 0),
                draining=(inst.model_name, inst.host, inst.port) in self._draining,
                weight=float(inst.weight or 0.0),  # as the route table takes it
            ))
        return rows

    # ---- gauges ---------------------------------------------------------

    def record_gauges(self, everything: bool) -> None:
        """The live-instance gauges of the models that changed since the last
        call (of every model with ``everything``), counted from those models'
        instances only."""
        self._record_load(everything)
        if everything:
            keys: set[str] | None = None
            self._gauge_keys = set()
        elif self._gauge_keys:
            keys, self._gauge_keys = self._gauge_keys, set()
        else:
            return
        unreachable = self.unreachable()
        live = self.live.merged.values() if keys is None else (i for k in keys for i in self.live.of_key(k))
        self._metrics.live_instances(live_counts([
            (i.model_name, "unreachable" if i.endpoint in unreachable else "healthy" if i.healthy else "unhealthy")
            for i in live
        ]), keys)

    def _record_load(self, everything: bool) -> None:
        """The in-flight gauge per model (a model whose load fell to nothing
        reads 0 once, then is left to age out); silent reporters dropped;
        stopped instances whose hold ended routable again if still listed."""
        now = self._clock()
        ended = [i for i, until in self._stopped.items() if until <= now]
        for i in ended:
            del self._stopped[i]
        if ended:
            self._reroute(ended)
            self._on_change()
        self.load.expire(now)
        self._loaded = _per_model_gauge(self._metrics.in_flight, self._loaded,
                                        self.load.by_model(now, queued=False), everything)
        self._waiting_gauge = _per_model_gauge(self._metrics.waiting, self._waiting_gauge,
                                               self.load.queued(now), everything)
        self._drained_gauge = _per_model_gauge(self._metrics.draining, self._drained_gauge,
                                               dict(Counter(key for key, _, _ in self._draining)), everything)


def _per_model_gauge(record: Callable[[dict[str, int]], None], last: dict[str, int], values: dict[str, int],
                     everything: bool) -> dict[str, int]:
    """Record a per-model gauge: what changed since ``last`` (everything, with
    ``everything``), and 0 once for a model that left it; the values, to pass
    as ``last`` next time."""
    report = dict(values) if everything else {k: n for k, n in values.items() if last.get(k) != n}
    report.update({k: 0 for k in last.keys() - values.keys()})
    if report:
        record(report)
    return values
