"""Deployments: a desired state the coordinator keeps, and the pure decision of
what to do about it. No Ray, no I/O, no clock: everything a decision depends
on comes in as an argument, so a table of cases tests it (tests/test_deployments.py).

A :class:`Deployment` asks for ``replicas`` running instances of one
``model@worker_type``, each on its own worker manager. :func:`decide` compares
it with what the live set shows (:class:`View`) and returns the actions that
move one step closer, and the state to report:

- an instance counts as **ready** when the registry lists it healthy and the
  probes do not find its worker unreachable; one that is listed but not ready
  counts as missing, and a replacement starts elsewhere — at once when its
  death is certain (connection refused, or gone from the registry) or nothing
  is known of an outage (registry-unhealthy while the probes never failed),
  after ``replace_after`` seconds from the start of an outage the probes saw
  without proof of death (a blip is not a death; the route table has dropped
  it meanwhile);
- an instance a driver's **operation** is restarting, starting or
  reconfiguring is neither missing nor replaced while that lasts;
- **placement** is on worker managers (``WorkerManager@service``) that are
  registry-healthy and reachable, within ``hosts`` if given, never two
  replicas on one manager; fewest replicas of this model on the manager's host
  first, then fewest models on the manager, then fewest failed starts there;
- a start that failed on a manager **backs off** there exponentially
  (:func:`backed_off`), and meanwhile the others are preferred;
- **scale-down** (including a dead instance that came back, leaving one too
  many) stops the extras on other params than the deployment's first, then
  those on the busiest managers: most models on the manager, then most
  replicas of this model on its host, then the highest ``host:port``;
- new ``params`` roll through the instances as ``update_params`` in batches of
  ``max_unavailable``, once the count is right (or, with ``max_surge``, new
  instances replace the old); :func:`params_at` says which instances run
  them — after a deploy back to the old params mid-surge, the ones the surge
  started are the ones that do not.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Self

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_serializer, field_validator,
                      model_validator)

from coordinator.core.autoscale import Autoscale
from coordinator.core.hosts import parse_endpoint
from coordinator.core.models import Endpoint, Name, WorkerType, worker_key

State = Literal["ready", "progressing", "degraded", "failing"]
#: Events a deployment's status keeps (the newest).
EVENTS_KEPT = 10


class Deployment(BaseModel):
    """N replicas of a model, placed across worker managers and kept there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Name
    worker_type: WorkerType = WorkerType.LLM
    replicas: NonNegativeInt
    #: What each start sends as DB-GPT's ``WorkerStartupRequest.params``
    #: (``name`` defaults to the model).
    params: dict[str, Any] = Field(default_factory=dict)
    #: Only these worker managers ("host:port"); None: any.
    hosts: list[str] | None = None
    #: Instances a params change may take down at once.
    max_unavailable: PositiveInt = 1
    #: Instances a params change may start beside the old ones: with it, each
    #: old instance is replaced by a new one started with the new params on
    #: another worker manager (ready first, then the old one is drained and
    #: stopped), so even one replica rolls without an outage. 0: the params
    #: are updated in place, ``max_unavailable`` at a time (drained first).
    max_surge: NonNegativeInt = 0
    #: The replica count follows the load (``replicas`` is where it starts):
    #: see :mod:`coordinator.core.autoscale`.
    autoscale: Autoscale | None = None

    @model_validator(mode="after")
    def _replicas_within_autoscale(self) -> Self:
        a = self.autoscale
        if a is not None and not a.min_replicas <= self.replicas <= a.max_replicas:
            raise ValueError(f"replicas ({self.replicas}) must be within autoscale.min_replicas "
                             f"({a.min_replicas}) and autoscale.max_replicas ({a.max_replicas})")
        return self

    @field_validator("hosts", mode="after")
    @classmethod
    def _endpoints(cls, hosts: list[str] | None) -> list[str] | None:
        if hosts is None:
            return None
        parsed = [parse_endpoint(h) for h in hosts]  # raises naming the bad one
        return [f"{h}:{p}" for h, p in parsed]

    @property
    def key(self) -> str:
        return worker_key(self.model, self.worker_type)

    @property
    def allowed(self) -> frozenset[Endpoint] | None:
        return None if self.hosts is None else frozenset(Endpoint(*parse_endpoint(h)) for h in self.hosts)

    @property
    def params_digest(self) -> str:
        return params_digest(self.params)


def check_distinct(deployments: list[Deployment]) -> None:
    """One deployment per model@type: a second one raises, naming the key."""
    keys = [d.key for d in deployments]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"one deployment per model@worker_type; repeated: {', '.join(repeated)}")


def params_digest(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DeploymentEvent(BaseModel):
    """One thing the reconciler did: what, where, why, and how it went."""

    at: float  # unix time (in JSON: ISO 8601, as every other time the status reports)
    action: str  # start / stop / update_params / apply stop / apply start
    endpoint: str | None = None
    reason: str
    ok: bool
    message: str = ""

    @field_serializer("at", when_used="json")
    def _iso(self, at: float) -> str:
        return datetime.fromtimestamp(at, UTC).isoformat()

    @field_validator("at", mode="before")
    @classmethod
    def _from_iso(cls, at: object) -> object:
        return datetime.fromisoformat(at).timestamp() if isinstance(at, str) else at


class DeploymentStatus(BaseModel):
    model: str
    worker_type: str
    replicas: int  # desired
    ready: int  # healthy and reachable instances
    instances: list[str]  # endpoints of the ready instances
    state: State
    last_error: str | None = None
    generation: int
    observed_generation: int
    events: list[DeploymentEvent] = Field(default_factory=list)
    #: The last round found no eligible worker manager for the missing
    #: replicas: waiting will not help until the fleet changes.
    stuck: bool = False

    @property
    def key(self) -> str:
        return worker_key(self.model, self.worker_type)


# ---- what a decision looks at -------------------------------------------


class Seen(NamedTuple):
    """One registry entry of the deployment's model."""

    endpoint: Endpoint
    healthy: bool  # as the registry lists it
    reachable: bool | None  # the probes' verdict; None: not probed yet
    #: Since when (unix time) the probes find it unreachable — or found it, if
    #: it answers again but the registry has not caught up with that yet;
    #: None: not known (then an unready instance is taken for dead at once).
    down_since: float | None = None
    #: The probe's connection was refused: the host answers and nothing listens
    #: on the port — a dead worker, not a network blip.
    refused: bool = False

    @property
    def ready(self) -> bool:
        return self.healthy and self.reachable is not False

    def held(self, now: float, replace_after: float) -> bool:
        """Not ready, within ``replace_after`` of an outage that began without
        proof of death: maybe a blip. The route table has dropped it already;
        a deployment waits before replacing it. (Its registry health is not
        asked: a registry may list it unhealthy because its heartbeats were
        overdue during the outage, and catch up at the next one.)"""
        return (not self.ready and not self.refused and self.down_since is not None
                and now - self.down_since < replace_after)


class Manager(NamedTuple):
    """One worker manager, as the live set shows it."""

    endpoint: Endpoint
    eligible: bool  # registry-healthy and not found unreachable
    models: int  # models it runs (healthy entries at its endpoint)


@dataclass(frozen=True)
class Backoff:
    """Failed starts in a row on one manager, and when the next may be tried."""

    failures: int
    retry_at: float
    last_error: str


def backed_off(prev: Backoff | None, now: float, error: str, initial: float = 1.0, maximum: float = 300.0) -> Backoff:
    """The backoff after one more failure: ``initial`` doubling up to ``maximum``,
    for any count of failures (the doubling stops at 2**64: beyond it ``2 ** n``
    would overflow a float after ~1,024 failures in a row and kill the keeper)."""
    failures = (prev.failures if prev else 0) + 1
    return Backoff(failures, now + min(maximum, initial * 2.0 ** min(failures - 1, 64)), error)


@dataclass(frozen=True)
class View:
    instances: list[Seen]
    managers: list[Manager]
    #: Managers a start was sent to whose instance is not ready yet.
    starting: frozenset[Endpoint] = frozenset()
    #: Instances a stop succeeded on that the registry may still list as
    #: healthy (it has not caught up yet): not counted as ready.
    stopping: frozenset[Endpoint] = frozenset()
    #: Per manager; the key None holds a params roll's backoff.
    backoff: Mapping[Endpoint | None, Backoff] = field(default_factory=dict)
    now: float = 0.0
    #: Whether the running instances have the deployment's params.
    params_current: bool = True
    #: Instances an operation is running on, or that one restarted, started or
    #: reconfigured and that are not ready again yet: neither missing nor
    #: replaced while that lasts (:meth:`coordinator.control.operations.Operations.operating`).
    operating: frozenset[Endpoint] = frozenset()
    #: Seconds an unreachable instance whose death is not certain is waited
    #: for before it is replaced (``reconcile.replace_after``).
    replace_after: float = 15.0
    #: When ``params_current`` is false: the instances known to run the
    #: deployment's params (a surge roll replaces the others; a scale-down
    #: stops the others first). See :func:`params_at`.
    fresh: frozenset[Endpoint] = frozenset()


class Action(NamedTuple):
    #: ``adopt``: every instance runs the deployment's params now (a surge
    #: roll is over): record it, send nothing.
    kind: Literal["start", "stop", "update_params", "adopt"]
    endpoint: Endpoint | None  # None for update_params (every instance, rolling) and adopt
    reason: str


class Decision(NamedTuple):
    actions: list[Action]
    state: State
    why: str | None  # when not ready: what is missing, in words
    #: No eligible worker manager for the missing replicas: waiting will not
    #: help until the fleet changes (``deploy --wait`` fails at once).
    stuck: bool = False
    #: When (unix time) this decision may change with nothing else changing:
    #: a held instance's wait ends.
    recheck_at: float | None = None


def params_at(applied: str, wanted: str, started: Mapping[Endpoint, str],
              present: Iterable[Endpoint]) -> tuple[bool, frozenset[Endpoint]]:
    """Whether the instances run the ``wanted`` params, and which of them are
    known to (:attr:`View.params_current`, :attr:`View.fresh`). Every
    instance runs ``applied`` but those in ``started`` (instance -> the digest
    of the params it was started or updated with); of those, only the ones
    ``present`` (ready or starting) count. Deployed back to ``applied`` in
    the middle of a surge, the instances the surge started run neither: they
    are the ones to replace."""
    if applied != wanted:
        return False, frozenset(ep for ep, digest in started.items() if digest == wanted)
    present = frozenset(present)
    other = {ep for ep, digest in started.items() if digest != wanted} & present
    return (True, frozenset()) if not other else (False, present - other)


def decide(spec: Deployment, view: View) -> Decision:
    """The actions that bring the live set one step closer to ``spec``."""
    backoff = view.backoff
    ready = sorted(s.endpoint for s in view.instances if s.ready and s.endpoint not in view.stopping)
    # Unreachable without proof of death, for less than replace_after: held
    # (counted, their managers taken) until they answer or the wait ends.
    held = {s.endpoint: s.down_since for s in view.instances
            if s.endpoint not in view.stopping and s.held(view.now, view.replace_after)}
    recheck = min((since + view.replace_after for since in held.values() if since is not None), default=None)
    starting = (set(view.starting) | set(view.operating) | set(held)) - set(ready)
    have = len(ready) + len(starting)
    replicas_on_host = Counter(ep.host for ep in [*ready, *starting])
    models_on = {m.endpoint: m.models for m in view.managers}
    not_ready = sorted(s.endpoint for s in view.instances if not s.ready)  # stopping ones are wanted stopped

    allowed = spec.allowed
    eligible = [m for m in view.managers
                if m.eligible and m.endpoint not in set(ready) | starting
                and (allowed is None or m.endpoint in allowed)]

    def pick(need: int) -> list[Endpoint]:
        """Up to ``need`` eligible managers not backing off, spread over hosts."""
        free = [m for m in eligible if m.endpoint not in backoff or backoff[m.endpoint].retry_at <= view.now]
        picks: list[Endpoint] = []
        while free and len(picks) < need:  # one at a time: each pick changes its host's count
            best = min(free, key=lambda m: (replicas_on_host[m.endpoint.host], m.models,
                                            backoff[m.endpoint].failures if m.endpoint in backoff else 0,
                                            m.endpoint))
            free.remove(best)
            picks.append(best.endpoint)
            replicas_on_host[best.endpoint.host] += 1
        return picks

    if have < spec.replicas:
        picks = pick(spec.replicas - have)
        missing = f"{len(ready)} of {spec.replicas} ready"
        if not_ready:
            missing += f"; not ready: {', '.join(map(str, not_ready))}"
        actions = [Action("start", ep, missing) for ep in picks]
        if actions or starting:
            return Decision(actions, "progressing", missing, recheck_at=recheck)
        waiting = [backoff[m.endpoint] for m in eligible if m.endpoint in backoff]
        if waiting:
            last = max(waiting, key=lambda b: b.retry_at)
            return Decision([], "failing", f"{missing}; starts failing, backing off: {last.last_error}")
        where = "" if allowed is None else f" among hosts {', '.join(sorted(map(str, allowed)))}"
        return Decision([], "degraded", f"{missing}; no other eligible worker manager{where}", stuck=True)

    if not view.params_current and spec.max_surge and ready:
        surge = _surge(spec, view, ready, starting, have, pick)
        if surge is not None:
            return surge

    if have > spec.replicas:
        if starting:
            return Decision([], "progressing", f"{len(starting)} starting")
        excess = have - spec.replicas
        # An instance on other params first: stopped, it needs no update.
        ranked = sorted(ready, key=lambda ep: (not view.params_current and ep not in view.fresh,
                                               models_on.get(ep, 0), replicas_on_host[ep.host], ep), reverse=True)
        why = f"{len(ready)} ready, {spec.replicas} wanted"
        return Decision([Action("stop", ep, why) for ep in ranked[:excess]], "progressing", why)

    if starting:
        if set(held) & starting:
            waits = ", ".join(f"{ep} (unreachable {view.now - since:.0f} s)" for ep, since in sorted(held.items())
                              if since is not None)
            return Decision([], "degraded", f"{len(ready)} of {spec.replicas} ready; waiting "
                            f"{view.replace_after:g} s before replacing {waits}", recheck_at=recheck)
        return Decision([], "progressing", f"{len(starting)} starting")
    if not view.params_current and ready:
        roll = backoff.get(None)
        if roll is not None and roll.retry_at > view.now:
            return Decision([], "failing", f"params update failed, backing off: {roll.last_error}")
        return Decision([Action("update_params", None, "params changed")], "progressing", "params changed")
    return Decision([], "ready", None)


def _surge(spec: Deployment, view: View, ready: list[Endpoint], starting: set[Endpoint], have: int,
           pick: Callable[[int], list[Endpoint]]) -> Decision | None:
    """One step of a surge roll: start up to ``max_surge`` instances with the
    new params beside the old ones; once they are ready, stop (drained) as
    many old ones; when none is left, adopt the params. None: no manager is
    free for a surge — the caller updates in place instead."""
    stale = sorted(ep for ep in ready if ep not in view.fresh)
    if not stale:
        if starting:
            return Decision([], "progressing", f"params changed: {len(starting)} starting with the new params")
        return Decision([Action("adopt", None, "every instance runs the new params")], "progressing",
                        "params changed")
    if starting:
        return Decision([], "progressing", f"params changed: {len(starting)} starting with the new params, "
                        f"{len(stale)} to replace")
    if have > spec.replicas:
        why = f"params changed: {len(stale)} to replace; {have} ready, {spec.replicas} wanted"
        return Decision([Action("stop", ep, "replaced by an instance with the new params")
                         for ep in stale[: have - spec.replicas]], "progressing", why)
    picks = pick(min(spec.max_surge, len(stale)))
    if not picks:
        return None
    why = f"params changed: starting {len(picks)} with the new params beside {len(stale)} to replace"
    return Decision([Action("start", ep, why) for ep in picks], "progressing", why)
