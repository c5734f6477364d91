"""The deployment keeper: the one place that carries out what
:func:`coordinator.core.deployments.decide` decides, and keeps the desired state.

Level-triggered: a round runs for every deployment on every change of the live
set (the service pokes it), on every deploy, and every ``resync_interval``.
A round takes its model's turn (the same per-model line as a driver's
startup/shutdown/apply, so it never overlaps one), decides from the live set as
it is then, and carries the actions out at once, concurrently.

What survives a restart lives in Ray's GCS key-value store, one record per
deployment: the spec, its generation, the params the instances run with, and
the starts in flight (written *before* a start is sent, so a coordinator that
dies mid-start and comes back counts that start instead of making a duplicate).
Backoffs and events are soft: a restarted coordinator tries once more.

It reaches the fleet only through :class:`Fleet` (the service implements it),
so tests can hand it a fake one.

Why this module is long: the keeper is one state machine. Its bookkeeping
(what is committed to the store and when), its loop and its actions share the
records and the lock that orders their changes; split apart they would reach
into each other's state. The decisions themselves are elsewhere (pure, in
:mod:`coordinator.core.deployments`).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, Field, TypeAdapter, model_validator

from coordinator.core.autoscale import ScaleState, next_replicas, why
from coordinator.core.config import ReconcileSettings
from coordinator.core.deployments import (
    EVENTS_KEPT,
    Action,
    Backoff,
    Decision,
    Deployment,
    DeploymentEvent,
    DeploymentStatus,
    Manager,
    Seen,
    View,
    backed_off,
    check_distinct,
    decide,
    params_at,
)
from coordinator.core.errors import NotDeployedError
from coordinator.plumbing.metrics import Metrics, NoMetrics
from coordinator.core.models import ApplyType, Endpoint, WorkerApplyOutput

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between two rounds of one deployment: a burst of live-set changes
#: (each of which asks for a round) shares the next one. A round reads every
#: worker manager, so on a large fleet this keeps a burst from costing a
#: round per change.
ROUND_PACE = 0.1
#: Starts of a deployment timed for its autoscaler (their median is its cold start).
STARTS_TIMED = 5


class Record(BaseModel):
    """What is kept of one deployment across restarts."""

    spec: Deployment
    generation: int
    observed_generation: int = 0
    #: Digest of the params the running instances were started or updated
    #: with (but those in ``started``).
    applied: str
    #: Starts in flight: "host:port" -> unix time after which, if its instance
    #: is still not ready, it counts as missing again.
    intents: dict[str, float] = Field(default_factory=dict)
    #: "host:port" -> digest of the params an instance was started (or
    #: updated) with, when that is not ``applied``: booked with its start,
    #: before it is sent, and kept across redeploys — deployed back to
    #: ``applied`` mid-surge, these are the instances on other params.
    started: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_fresh(cls, data: Any) -> Any:
        """A record kept by an older coordinator lists ``fresh``: the
        instances started with its spec's params."""
        if isinstance(data, dict) and "fresh" in data and "started" not in data:
            digest = Deployment.model_validate(data["spec"]).params_digest
            data = {**data, "started": dict.fromkeys(data["fresh"], digest)}
        return data


_RECORDS = TypeAdapter(dict[str, Record])


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> None: ...

    async def delete(self, key: str, prefix: bool = False) -> None: ...


class Fleet(Protocol):
    """What the keeper needs of the coordinator."""

    def observe(self, key: str) -> tuple[list[Seen], list[Manager]]: ...

    def operating(self, key: str) -> frozenset[Endpoint]:
        """Instances of ``key`` a driver's operation is restarting, starting or
        reconfiguring (not to be counted missing meanwhile)."""
        ...

    async def rebuilt(self) -> None: ...

    async def in_turn(self, key: str, start: Callable[[], Awaitable[T]], same: tuple[str, ...]) -> T: ...

    async def start(self, ep: Endpoint, spec: Deployment) -> WorkerApplyOutput: ...

    async def stop(self, ep: Endpoint, spec: Deployment) -> tuple[WorkerApplyOutput, WorkerApplyOutput | None]:
        """Shut the instance down, drained first; if the shutdown fails, stop
        it with an apply stop under the same drain (DB-GPT 0.8.2's shutdown
        fails when its worker has no model storage, docs/protocol.md). The
        shutdown's output, and the apply stop's if one was sent."""
        ...

    async def apply_one(self, ep: Endpoint, spec: Deployment, apply_type: ApplyType) -> WorkerApplyOutput: ...

    async def roll(self, spec: Deployment) -> list[WorkerApplyOutput]: ...

    def changed(self) -> None: ...


def _endpoint(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return Endpoint(host, int(port))


class Keeper:
    def __init__(
        self, fleet: Fleet, store: Store, state_key: str, settings: ReconcileSettings,
        startup_timeout: float, metrics: Metrics | None = None, settle: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fleet = fleet
        self._store = store
        self._state_key = state_key
        self._settings = settings
        self._startup_timeout = startup_timeout
        self._metrics = metrics or NoMetrics()
        self._settle = settle  # seconds to let the first probes answer before the first round
        self._clock = clock
        self._records: dict[str, Record] = {}
        self._backoff: dict[str, dict[Endpoint | None, Backoff]] = {}
        self._events: dict[str, deque[DeploymentEvent]] = {}
        self._last_error: dict[str, str | None] = {}
        #: Per key, instances a stop succeeded on -> unix time until which they
        #: are not counted while the registry may still list them healthy.
        self._stopped: dict[str, dict[Endpoint, float]] = {}
        self._acting: set[str] = set()  # keys whose round is carrying out actions
        self._recheck: dict[str, float] = {}  # keys whose decision changes by itself then (unix time)
        self._dirty: set[str] = set()
        self._rounds: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loaded = asyncio.Event()
        self._save_lock = asyncio.Lock()
        self._forgotten = False  # forget() ran: nothing is kept any more
        self._shown: dict[str, tuple[str, bool, int]] = {}  # key -> (state, stuck, observed) last told
        #: Autoscaled deployments: what their load asks for (soft: a restarted
        #: coordinator starts again from ``replicas``, and from the first sample).
        self._scale: dict[str, ScaleState] = {}
        #: Seconds the last starts of each deployment took, up to STARTS_TIMED
        #: (an autoscale policy without ``startup_s`` looks that far ahead).
        self._startups: dict[str, deque[float]] = {}
        #: Each autoscaled deployment's replicas serving at its last sample.
        self._ready: dict[str, int] = {}

    # ---- the desired state ----------------------------------------------

    async def load(self, configured: Iterable[Deployment] = ()) -> None:
        """Read the kept records; deploy the configured ones not kept yet."""
        raw = await self._store.get(self._state_key)
        self._records = _RECORDS.validate_json(raw) if raw else {}
        fresh = {d.key: Record(spec=d, generation=1, applied=d.params_digest)
                 for d in configured if d.key not in self._records}
        if fresh:
            await self._commit(lambda records: fresh)
        self._loaded.set()
        self.poke()

    async def deploy(self, specs: list[Deployment]) -> list[int]:
        """Create or replace the desired state of each spec's model@type; the
        generation of each (unchanged for an identical spec)."""
        check_distinct(specs)
        await self._loaded.wait()
        generations: list[int] = []
        changed: dict[str, Record | None] = {}
        held_digests: dict[str, str] = {}

        def replace(records: dict[str, Record]) -> dict[str, Record | None]:
            generations.clear(), changed.clear(), held_digests.clear()
            for spec in specs:
                held = records.get(spec.key)
                if held is not None:
                    held_digests[spec.key] = held.spec.params_digest
                if held is not None and held.spec == spec:
                    generations.append(held.generation)
                    continue
                changed[spec.key] = Record(
                    spec=spec,
                    generation=(held.generation + 1) if held else 1,
                    observed_generation=held.observed_generation if held else 0,
                    # A first deploy adopts running instances as they are; a
                    # redeploy keeps what they run, so new params roll out.
                    applied=held.applied if held else spec.params_digest,
                    intents=dict(held.intents) if held else {},
                    # What each instance was started with stays true whatever is deployed.
                    started=dict(held.started) if held else {},
                )
                generations.append(changed[spec.key].generation)
            return changed or None

        # Kept first, then in memory: a refused save changes nothing. A round
        # running meanwhile books its actions on the record by key, and the
        # next round decides on the new spec.
        await self._commit(replace)
        for key, rec in changed.items():
            assert rec is not None
            if rec.spec.params_digest != held_digests.get(key):
                # A failed roll of other params says nothing of these: not waited for.
                self._backoff.get(key, {}).pop(None, None)
            self._event(key, "deploy", None, f"generation {rec.generation}: {rec.spec.replicas} replicas", True)
        self.poke()
        return list(generations)

    async def undeploy(self, key: str, shutdown: bool = False) -> DeploymentStatus:
        """Forget the desired state of ``key``; with ``shutdown``, first stop
        every instance of it. Its last status."""
        await self._loaded.wait()
        held = self._records.get(key)
        if held is None:
            raise NotDeployedError(key)
        if shutdown:
            await self._book(key, lambda held: held.model_copy(update={
                "spec": held.spec.model_copy(update={"replicas": 0, "autoscale": None, "max_surge": 0}),
                "generation": held.generation + 1}))
            await self._fleet.in_turn(key, lambda: self._round(key), ("reconcile", key))
        last = self.status(key)
        await self._commit(lambda records: {key: None})
        for soft in (self._backoff, self._last_error, self._events, self._stopped, self._recheck, self._shown,
                     self._scale, self._startups, self._ready):
            soft.pop(key, None)
        self._metrics.deployment(key, 0, 0, False, present=False)
        return last

    async def forget(self) -> None:
        """Remove the kept state (when the coordinator is stopped on purpose);
        no change is kept after it (a round still finishing books nothing)."""
        async with self._save_lock:
            self._forgotten = True
            await self._store.delete(self._state_key)

    async def _commit(self, change: Callable[[dict[str, Record]], dict[str, Record | None] | None]) -> bool:
        """Change the records: ``change`` sees them as they are (under the lock,
        so changes never interleave) and returns what to replace (None:
        remove), or None for nothing. The store takes the result first; memory
        changes only once it did — a refused save raises and changes nothing."""
        async with self._save_lock:
            if self._forgotten:
                return False
            changes = change(self._records)
            if changes is None:
                return False
            records = dict(self._records)
            for key, rec in changes.items():
                if rec is None:
                    records.pop(key, None)
                else:
                    records[key] = rec
            await self._store.put(self._state_key, _RECORDS.dump_json(records))
            self._records = records
            return True

    async def _book(self, key: str, update: Callable[[Record], Record]) -> bool:
        """Kept, then in memory: ``update`` of the deployment's record as it is
        by then (a deploy during a round replaced it: the outcome of an action
        still lands on the live record, never an orphan)."""
        return await self._commit(lambda records: {key: update(records[key])} if key in records else None)

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    # ---- status ---------------------------------------------------------

    def keys(self) -> list[str]:
        return sorted(self._records)

    def spec(self, key: str) -> Deployment | None:
        held = self._records.get(key)
        return held.spec if held else None

    def status(self, key: str) -> DeploymentStatus:
        held = self._records.get(key)
        if held is None:
            raise NotDeployedError(key)
        decision, view = self._decide(key, held)
        ready = sorted(s.endpoint for s in view.instances if s.ready and s.endpoint not in view.stopping)
        state = "progressing" if key in self._acting and decision.state != "failing" else decision.state
        if held.observed_generation < held.generation:
            state = "progressing"
        return DeploymentStatus(
            model=held.spec.model, worker_type=held.spec.worker_type.value,
            replicas=self._target(key, held.spec).replicas,
            ready=len(ready), instances=[str(ep) for ep in ready], state=state,
            last_error=None if state == "ready" else (self._last_error.get(key) or decision.why),
            generation=held.generation, observed_generation=held.observed_generation,
            events=list(self._events.get(key, ())),
            stuck=decision.stuck and held.observed_generation >= held.generation and key not in self._acting,
        )

    def statuses(self) -> list[DeploymentStatus]:
        return [self.status(k) for k in self.keys()]

    def plan(self, specs: list[Deployment]) -> list[tuple[str, Decision]]:
        """What a round would do now for each spec (nothing is sent)."""
        check_distinct(specs)
        out = []
        for spec in specs:
            held = self._records.get(spec.key)
            applied = held.applied if held else spec.params_digest
            record = Record(spec=spec, generation=0, applied=applied, intents=held.intents if held else {},
                            started=held.started if held else {})
            out.append((spec.key, self._decide(spec.key, record)[0]))
        return out

    def _view(self, key: str, held: Record) -> View:
        instances, managers = self._fleet.observe(key)
        now = self._clock()
        # A start in flight for another deployment is a model on that manager
        # already (two deployments placed in one breath must not stack).
        elsewhere = Counter(_endpoint(t) for k, rec in self._records.items() if k != key
                            for t, until in rec.intents.items() if until > now)
        if elsewhere:
            managers = [m._replace(models=m.models + elsewhere[m.endpoint]) for m in managers]
        ready = {s.endpoint for s in instances if s.ready}
        eligible = {m.endpoint for m in managers if m.eligible}
        starting = frozenset(
            ep for ep, until in ((_endpoint(t), u) for t, u in held.intents.items())
            if until > now and ep not in ready and ep in eligible
        )
        stopped = self._stopped.get(key, {})
        for ep in [ep for ep, until in stopped.items() if until <= now or ep not in ready]:
            del stopped[ep]  # the registry caught up (or never will: then it counts again)
        current, fresh = params_at(held.applied, held.spec.params_digest,
                                   {_endpoint(t): d for t, d in held.started.items()}, ready | starting)
        return View(instances=instances, managers=managers, starting=starting, stopping=frozenset(stopped),
                    backoff=self._backoff.get(key, {}), now=now, params_current=current, fresh=fresh,
                    operating=self._fleet.operating(key), replace_after=self._settings.replace_after)

    def _decide(self, key: str, held: Record) -> tuple[Decision, View]:
        view = self._view(key, held)
        return decide(self._target(key, held.spec), view), view

    # ---- autoscaling ----------------------------------------------------

    def _target(self, key: str, spec: Deployment) -> Deployment:
        """``spec`` as a round decides on it: with ``autoscale``, the replicas
        its load asks for now."""
        state = self._scale.get(key) if spec.autoscale is not None else None
        if state is None or state.replicas == spec.replicas:
            return spec
        return spec.model_copy(update={"replicas": state.replicas})

    def hold_for(self, key: str) -> float:
        """Seconds a caller holds a request for ``key`` while no instance is
        ready: the deployment's ``from_zero_timeout_s`` if it may scale to
        zero, else 0."""
        held = self._records.get(key)
        policy = held.spec.autoscale if held is not None else None
        return policy.from_zero_timeout_s if policy is not None and policy.min_replicas == 0 else 0.0

    def wanted_from_zero(self, keys: Iterable[str]) -> bool:
        """Whether any of ``keys`` (models with requests waiting) is a
        deployment that scales from zero and has no replica serving now (at
        zero, or its first ones still starting): its requests are worth a
        decision at once, not at the next second's sample."""
        for key in keys:
            state = self._scale.get(key)
            # Its replicas serving as of the last sample (a report's question
            # must not cost a look over the fleet).
            if self.hold_for(key) > 0 and state is not None and (state.replicas == 0 or not self._ready.get(key)):
                return True
        return False

    def autoscale(self, load: dict[str, float], keys: Iterable[str] | None = None) -> None:
        """One load sample per model@type (requests in flight and waiting, over
        every caller): each autoscaled deployment's count follows it (only
        those of ``keys`` when given), and a change gets a round at once."""
        now = self._clock()
        changed = False
        only = None if keys is None else set(keys)
        for key, held in list(self._records.items()):
            if only is not None and key not in only:
                continue
            policy = held.spec.autoscale
            if policy is None:
                self._scale.pop(key, None)
                self._ready.pop(key, None)
                continue
            instances, managers = self._fleet.observe(key)
            allowed = held.spec.allowed
            placeable = sum(1 for m in managers if m.eligible and (allowed is None or m.endpoint in allowed))
            ready = self._ready[key] = sum(1 for s in instances if s.ready)
            # First sample (a new deployment, or a coordinator that restarted):
            # from what runs, so a restart does not reset the count to ``replicas``.
            before = self._scale.get(key) or ScaleState(
                replicas=min(max(ready, policy.min_replicas), policy.max_replicas) if ready else held.spec.replicas)
            # Managers not seen (yet) are not a reason to stop what runs.
            timed = self._startups.get(key)
            after = next_replicas(policy, before, load.get(key, 0.0), now, max(placeable, ready),
                                  statistics.median(timed) if timed else None, ready)
            self._scale[key] = after
            if after.replicas != before.replicas:
                changed = True
                reason = why(policy, before, after, load.get(key, 0.0))
                self._event(key, "autoscale", None, reason, True, f"{before.replicas} -> {after.replicas} replicas")
                log.info("deployment %s: autoscale %d -> %d replicas (%s)", key, before.replicas, after.replicas,
                         reason)
        if changed:
            self.poke()

    # ---- the loop -------------------------------------------------------

    def poke(self) -> None:
        """Something changed: every deployment gets a round."""
        self._dirty |= set(self._records)
        self._wake.set()

    async def run(self) -> None:
        """Reconcile until cancelled."""
        await self._loaded.wait()
        await self._fleet.rebuilt()
        await asyncio.sleep(self._settle)
        try:
            while True:
                self._wake.clear()
                for key in sorted(self._dirty):
                    if key not in self._rounds and key in self._records:
                        self._rounds[key] = asyncio.get_running_loop().create_task(self._rounds_of(key))
                try:
                    timeout = self._next_wake()
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    self.poke()
        finally:  # rounds do not outlive the loop (a restart of it starts them again)
            for task in list(self._rounds.values()):
                task.cancel()
            self._rounds.clear()

    def _next_wake(self) -> float:
        """Seconds until the resync, or until a backoff ends if sooner."""
        now = self._clock()
        ends = [b.retry_at - now for per in self._backoff.values() for b in per.values() if b.retry_at > now]
        ends += [at - now for at in self._recheck.values() if at > now]
        return max(0.05, min([self._settings.resync_interval, *ends]))

    async def _rounds_of(self, key: str) -> None:
        try:
            while key in self._dirty and key in self._records:
                self._dirty.discard(key)
                await self._fleet.in_turn(key, lambda: self._round(key), ("reconcile", key))
                await asyncio.sleep(ROUND_PACE)
        except asyncio.CancelledError:
            raise
        except Exception:  # the loop survives; the next change or resync tries again
            log.exception("reconciling %s failed", key)
        finally:
            self._rounds.pop(key, None)

    async def _round(self, key: str) -> None:
        outcome: list[tuple[Record, Decision, View]] = []

        def book(records: dict[str, Record]) -> dict[str, Record | None] | None:
            # Decided under the store's lock, so a round deciding meanwhile (for
            # another model) sees these starts as booked on their managers.
            held = records.get(key)
            if held is None:
                return None
            decision, view = self._decide(key, held)
            alive = {str(ep) for ep in view.starting}
            intents = {t: u for t, u in held.intents.items() if t in alive}
            until = self._clock() + self._startup_timeout + self._settings.appear_within
            starts = [str(a.endpoint) for a in decision.actions if a.kind == "start"]
            intents.update(dict.fromkeys(starts, until))
            # What they start with, on record before it is sent (a deploy
            # meanwhile does not change what they run).
            started = {t: d for t, d in held.started.items() if t not in starts}
            if held.spec.params_digest != held.applied:
                started.update(dict.fromkeys(starts, held.spec.params_digest))
            booked = held.model_copy(update={"observed_generation": held.generation, "intents": intents,
                                             "started": started})
            outcome.append((booked, decision, view))
            # The starts are on record before they are sent; memory changes
            # only once the store took it (a refused save sends nothing).
            return {key: booked} if booked != held else None

        await self._commit(book)
        if not outcome:
            return
        held, decision, view = outcome[0]
        if decision.recheck_at != self._recheck.get(key):  # the loop's next wake may move earlier
            if decision.recheck_at is None:
                self._recheck.pop(key, None)
            else:
                self._recheck[key] = decision.recheck_at
            self._wake.set()
        if decision.state == "ready":
            self._last_error[key] = None
        self._report(key, held, view, decision)
        shown = (decision.state, decision.stuck, held.observed_generation)
        if self._shown.get(key) != shown:  # a deploy(wait=True) is waiting for this
            self._shown[key] = shown
            self._fleet.changed()
        if not decision.actions:
            return
        self._acting.add(key)
        try:
            async with asyncio.TaskGroup() as tg:
                for action in decision.actions:
                    tg.create_task(self._isolated(key, held.spec, action, view))
        finally:
            self._acting.discard(key)
            now = self._records.get(key)
            if now is not None:
                self._report(key, now, self._view(key, now))
            self._fleet.changed()

    async def _isolated(self, key: str, spec: Deployment, action: Action, view: View) -> None:
        """One action; its unexpected failure is its own (logged, an event),
        never its siblings' (a task group would cancel them mid-call)."""
        try:
            await self._carry_out(key, spec, action, view)
        except Exception as exc:
            log.exception("deployment %s: %s %s failed unexpectedly", key, action.kind, action.endpoint)
            self._event(key, action.kind, action.endpoint, action.reason, False, f"{type(exc).__name__}: {exc}")
            self._last_error[key] = f"{action.kind} {action.endpoint}: {type(exc).__name__}: {exc}"

    async def _carry_out(self, key: str, spec: Deployment, action: Action, view: View) -> None:
        """Carry out one action of ``spec`` (the spec the round decided on);
        its bookkeeping goes to the deployment's record as it is by then."""
        match action.kind:
            case "start":
                await self._start(key, spec, action, view)
            case "stop":
                out, fallback = await self._fleet.stop(action.endpoint, spec)
                then = None if fallback is None else ("apply stop", fallback)
                if self._done(key, action, "stop", out, then):
                    self._stopped.setdefault(key, {})[action.endpoint] = self._clock() + self._settings.appear_within
                    gone = str(action.endpoint)
                    if gone in getattr(self._records.get(key), "started", {}):  # nothing runs there any more
                        await self._book(key, lambda held: held.model_copy(update={"started": {
                            t: d for t, d in held.started.items() if t != gone}}))
            case "adopt":
                self._event(key, "adopt", None, action.reason, True, "every instance runs the new params")
                await self._book(key, lambda held: held.model_copy(update={"applied": spec.params_digest,
                                                                           "started": {}})
                                 if held.spec.params_digest == spec.params_digest else held)
            case "update_params":
                outs = await self._fleet.roll(spec)
                ok = bool(outs) and all(o.success for o in outs)
                failed = "; ".join(o.message for o in outs if not o.success) or "no instance answered"
                self._metrics.reconcile_action("update_params", "success" if ok else "failure")
                self._event(key, "update_params", None, action.reason, ok,
                            f"{len(outs)} instances updated" if ok else failed)
                per = self._backoff.setdefault(key, {})
                if ok:
                    per.pop(None, None)
                    # what the instances run now, whatever was deployed meanwhile
                    await self._book(key, lambda held: held.model_copy(update={"applied": spec.params_digest,
                                                                               "started": {}}))
                else:
                    # Those it did update run the new params, whatever is deployed next.
                    updated = [str(Endpoint(o.host, o.port)) for o in outs if o.success]
                    await self._book(key, lambda held: held.model_copy(update={"started": {
                        **{t: d for t, d in held.started.items() if t not in updated},
                        **({} if held.applied == spec.params_digest else dict.fromkeys(updated, spec.params_digest))}}))
                    per[None] = backed_off(per.get(None), self._clock(), failed, self._settings.backoff_initial,
                                           self._settings.backoff_max)
                    self._last_error[key] = f"params update failed: {failed}"

    async def _start(self, key: str, spec: Deployment, action: Action, view: View) -> None:
        ep = action.endpoint
        began = self._clock()
        out = await self._fleet.start(ep, spec)
        took = self._clock() - began
        # A cold start, timed (a fallback's apply start is not one); a clock
        # that stepped meanwhile says nothing.
        if out.success and 0 <= took <= self._startup_timeout:
            self._startups.setdefault(key, deque(maxlen=STARTS_TIMED)).append(took)
        then = None
        if not out.success and any(s.endpoint == ep for s in view.instances):
            # Listed there but not ready: a worker manager that holds the model
            # stopped refuses a startup of it; an apply start brings it back.
            then = ("apply start", await self._fleet.apply_one(ep, spec, ApplyType.START))
        ok = self._done(key, action, "start", out, then)
        per = self._backoff.setdefault(key, {})
        if ok:
            per.pop(ep, None)
        else:
            message = (then[1] if then else out).message
            per[ep] = backed_off(per.get(ep), self._clock(), f"{ep}: {message}", self._settings.backoff_initial,
                                 self._settings.backoff_max)
        until = self._clock() + self._settings.appear_within

        def outcome(held: Record) -> Record:
            intents = dict(held.intents)
            started = dict(held.started)
            if ok:
                intents[str(ep)] = until  # now it has a while to appear
            else:
                intents.pop(str(ep), None)
                started.pop(str(ep), None)  # nothing runs there with those params
            return held.model_copy(update={"intents": intents, "started": started})

        await self._book(key, outcome)

    def _done(self, key: str, action: Action, kind: str, out: WorkerApplyOutput,
              then: tuple[str, WorkerApplyOutput] | None = None) -> bool:
        """Record an action's outcome (and its fallback's); whether it worked."""
        ok = out.success or (then is not None and then[1].success)
        message = out.message
        if then is not None:
            message = f"{kind} failed ({out.message}); {then[0]}: " + (
                "succeeded" if then[1].success else f"failed too ({then[1].message})")
        self._metrics.reconcile_action(kind, "success" if out.success else "fallback" if ok else "failure")
        self._event(key, kind, action.endpoint, action.reason, ok, message)
        if not ok:
            self._last_error[key] = message
        log.info("deployment %s: %s %s (%s): %s", key, kind, action.endpoint, action.reason, message)
        return ok

    def _event(self, key: str, action: str, ep: Endpoint | None, reason: str, ok: bool, message: str = "") -> None:
        self._events.setdefault(key, deque(maxlen=EVENTS_KEPT)).append(DeploymentEvent(
            at=self._clock(), action=action, endpoint=None if ep is None else str(ep), reason=reason, ok=ok,
            message=message))

    def _report(self, key: str, held: Record, view: View, decision: Decision | None = None) -> None:
        ready = sum(1 for s in view.instances if s.ready and s.endpoint not in view.stopping)
        target = self._target(key, held.spec)
        failing = (decision or decide(target, view)).state == "failing"
        self._metrics.deployment(key, target.replicas, ready, failing)

