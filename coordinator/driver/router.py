"""Requests from the caller's process straight to the workers, chosen with what
the coordinator knows — and the coordinator never on a request's path.

:class:`Router` keeps the caller's copy of the coordinator's route table
(instances that are listed healthy, enabled, and found reachable by the
probes), followed by long poll from a daemon thread, as Ray Serve's routers
follow their replica sets. One router per process and coordinator
(:meth:`Router.acquire`), shared by every ``RayWorkerManager`` of that
coordinator: one follower thread and one long poll parked at the coordinator
per process, and one count of the requests in flight from the process to each
worker. Choosing an instance is then local, by the model's routing policy,
among the instances below the per-worker connection limit
(``caller.max_connections_per_worker``).

The router also reports its requests in flight per instance, and those
waiting per model (held for a model scaling from zero, or queued by flow
control), to the coordinator (a second daemon thread): at once when they change, coalesced,
every ``caller.report_every`` seconds while there are any, and after each
route-table change it takes, saying which table it has applied (a drain waits
until every caller has: see :mod:`coordinator.core.load`). The
coordinator sums the reports of every caller (see
:mod:`coordinator.core.load`) — what a drain waits on — and answers each with
what the *other* callers have in flight, which the policies add to the
router's own count: gateway replicas and driver processes share one figure of
the load.

:class:`~coordinator.driver.caller.WorkerCaller` carries the choice: the
HTTP to the worker, and what can go wrong as **never sent** (safe to send
elsewhere, and the instance is suspect until the probes say it answers) or
**maybe received** (never resent).

Why this module is long: the route table and the load reports share the
router's lock and its state (what it holds, has in flight and reports are
one snapshot), so the follower, the reporter and the choice stay together.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import random
import socket
import threading
import uuid
import time
import weakref
from collections import Counter
from typing import Any

import ray
from ray.exceptions import RayError

from coordinator.core.changes import ChangeLog
from coordinator.core.config import FlowSettings
from coordinator.core.inference import Candidate, Route, route_identity
from coordinator.core.routing import ModelPolicies, Reason, RoutingSettings
from coordinator.driver.flow_gate import FlowGate

log = logging.getLogger(__name__)

#: Seconds a long poll of the route table waits before answering "nothing new".
POLL_TIMEOUT = 10.0
#: Seconds an instance whose connection failed is skipped, unless the route
#: table says sooner that its probes find it answering.
SUSPECT_FOR = 5.0
#: Sends of one request at most: the first, and two to other instances when
#: the earlier ones provably never reached a worker.
MAX_SENDS = 3
#: Seconds between two load reports at least: changes within it go in one.
REPORT_GAP = 0.05
#: What the reporting threads are called.
REPORTER_THREAD = "load-report"
#: Seconds the coordinator's answer to "hold requests for this model?" is kept,
#: for at most this many models, and waited for at most this long.
HOLD_KNOWN_FOR = 5.0
HOLD_KNOWN_MAX = 1024
HOLD_ASK_WAIT = 2.0
#: Seconds between looks at the route table while a request is held.
HOLD_LOOK = 0.05
#: Requests held at once by one process for want of an instance, at most
#: (more fail at once, as without holding).
MAX_HELD = 1000


#: The routers of this process, by coordinator (name, namespace).
_SHARED: dict[tuple[str, str], Router] = {}
_SHARED_LOCK = threading.Lock()
#: What the follower threads are called (one per process and coordinator).
FOLLOWER_THREAD = "route-table"
#: Routers whose follower thread runs (or ends): stopped at exit, before Ray
#: shuts down — a thread still parked in ray.get then makes the process exit 1.
_FOLLOWING: weakref.WeakSet[Router] = weakref.WeakSet()
#: Seconds the process's exit waits for the follower threads to end.
EXIT_WAIT = 2.0


def _stop_all() -> None:
    routers = list(_FOLLOWING)
    for router in routers:
        router.stop()
    deadline = time.monotonic() + EXIT_WAIT
    for router in routers:
        router.join(max(0.0, deadline - time.monotonic()))


class Router:
    """The caller's copy of the route table, and the choice of an instance.

    Shared per process and coordinator: take it with :meth:`acquire` and give
    it back with :meth:`release`; the last release stops the follower."""

    def __init__(self, cluster: Any, poll_timeout: float = POLL_TIMEOUT, suspect_for: float = SUSPECT_FOR,
                 rng: random.Random | None = None) -> None:
        self._cluster = cluster
        self._poll_timeout = poll_timeout
        self._suspect_for = suspect_for
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._table: ChangeLog[tuple[str, str, int], Route] = ChangeLog(route_identity)
        self._index: dict[str, dict[tuple[str, str, int], Route]] = {}  # the table by model (follower thread's)
        self._by_key: dict[str, tuple[Route, ...]] = {}  # what choices read: swapped whole per model
        self._in_flight: Counter[tuple[str, int]] = Counter()  # per worker: the connection limit's count
        self._by_instance: Counter[tuple[str, str, int]] = Counter()  # per (model@type, host, port): reported
        #: What the other callers have in flight, per instance (the coordinator's last answer).
        self._others: dict[tuple[str, str, int], int] = {}
        self._load_changed = threading.Event()
        self._applied: tuple[str, int] | None = None  # the route table's position, as last taken
        self._report_every = 1.0
        self._idle_every = 2.5  # caller.report_ttl / 2
        self._reporter_thread: threading.Thread | None = None
        #: This router's life, as the coordinator counts its reports: a new one
        #: per router, so a restarted process starts from zero.
        self.reporter = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: Requests held per model for want of any instance (scale from zero),
        #: and the coordinator's word on how long to hold them: key -> (seconds, known until).
        self._queued: Counter[str] = Counter()
        #: Requests waiting per model in a flow gate of this process (also reported as queued).
        self._waiting: Counter[str] = Counter()
        #: The process's flow gate of this coordinator's callers (caller.flow), and its settings.
        self._gate: tuple[FlowSettings, FlowGate] | None = None
        self._hold_known: dict[str, tuple[float, float]] = {}
        self.reports = 0  # load reports the coordinator took (for tests and stats)
        self._suspect: dict[tuple[str, int], float] = {}
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll: Any = None  # the long poll parked at the coordinator now
        self._leases = 0
        self.updates = 0  # route-table changes received (for tests and stats)
        #: How instances are chosen (config ``routing``): per model, and what
        #: the cache-aware policy has learned of where prompts went.
        self._policy = ModelPolicies(rng=self._rng)

    def configure(self, settings: RoutingSettings, report_every: float | None = None,
                  report_ttl: float | None = None) -> None:
        """Route by ``settings`` (what is learned is kept while they stay the
        same); report the load every ``report_every`` seconds while any, and
        at least every ``report_ttl / 2`` seconds while idle."""
        with self._lock:
            if settings != self._policy.settings:
                self._policy = ModelPolicies(settings, rng=self._rng)
            if report_every is not None:
                self._report_every = report_every
            if report_ttl is not None:
                self._idle_every = report_ttl / 2

    # ---- one per process and coordinator ----------------------------------

    @classmethod
    def acquire(cls, cluster: Any) -> Router:
        """The router of ``cluster``'s coordinator in this process (made on the
        first call; nothing is sent until it is first waited on)."""
        key = (cluster.name, cluster.namespace)
        with _SHARED_LOCK:
            router = _SHARED.get(key)
            if router is None:
                router = _SHARED[key] = cls(cluster)
            router._leases += 1
            return router

    def release(self) -> None:
        """Give back one :meth:`acquire`; the last one stops the follower."""
        key = (self._cluster.name, self._cluster.namespace)
        with _SHARED_LOCK:
            self._leases -= 1
            if self._leases > 0:
                return
            if _SHARED.get(key) is self:
                del _SHARED[key]
        self.stop()

    # ---- following the coordinator ----------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stopped.is_set():
                name = f"{FOLLOWER_THREAD} {self._cluster.namespace}/{self._cluster.name}"
                self._thread = threading.Thread(target=self._follow, name=name, daemon=True)
                self._reporter_thread = threading.Thread(target=self._report, name=f"{REPORTER_THREAD} {name}",
                                                         daemon=True)
                with _SHARED_LOCK:
                    if not _FOLLOWING:
                        # Registered after ray.init (nothing follows before it), so run before Ray's own exit hook;
                        # registering again once the set emptied is harmless (stopping twice is a no-op).
                        atexit.unregister(_stop_all)
                        atexit.register(_stop_all)
                    _FOLLOWING.add(self)
                self._thread.start()
                self._reporter_thread.start()

    def stop(self) -> None:
        """Stop following: the parked long poll is cancelled, so the thread
        ends at once instead of at the poll's timeout."""
        self._stopped.set()
        self._load_changed.set()  # the reporter says goodbye and ends
        poll = self._poll
        if poll is not None:
            try:
                ray.cancel(poll)
            except Exception as exc:  # gone already, or Ray is shutting down
                log.debug("route table: cancelling the long poll: %s", exc)

    def join(self, timeout: float) -> bool:
        """Wait (bounded) for the follower and reporter threads to end; whether they have."""
        deadline = time.monotonic() + timeout
        threads = [t for t in (self._thread, self._reporter_thread) if t is not None]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    @property
    def ready(self) -> bool:
        """Whether the first route table has arrived."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        self.start()
        return self._ready.wait(timeout)

    def _follow(self) -> None:
        since: tuple[str, int] | None = None
        failures = 0
        while not self._stopped.is_set():
            try:
                ref = self._poll = self._cluster._handle.routes_since.remote(since, self._poll_timeout)
                if self._stopped.is_set():  # stopped while sending: stop() may have missed this one
                    ray.cancel(ref)
                    return
                # Waited for as a future, not with ray.get: in an async actor's
                # process (the gateway) ray.get warns of blocking the event loop,
                # although this thread is not the loop's.
                change = ref.future().result(timeout=self._poll_timeout + 30)
            except (RayError, TimeoutError) as exc:  # restarting, replaced, or slow: keep the table, ask again
                if self._stopped.is_set():
                    return
                failures += 1
                if failures == 1:
                    log.warning("route table: the coordinator did not answer (%s); keeping the last table", exc)
                self._cluster._reresolve()
                time.sleep(min(5.0, 0.1 * 2 ** min(failures, 6)))
                continue
            except Exception:  # the thread survives; a bug worth a traceback
                log.exception("route table: following failed")
                time.sleep(1.0)
                continue
            failures = 0
            if change is not None:
                self._take(change)
                since = (change.epoch, change.version)
                self._load_changed.set()  # tell the coordinator this table is applied (a drain waits on it)
            self._ready.set()

    def _take(self, change: Any) -> None:  # the follower thread's
        """Apply one change; rebuild the choice lists of the models it touched
        only (costs what changed and those models' instances, not the table)."""
        keys: set[str] = set()
        for ident in self._table.apply(change):
            route = self._table.get(ident)
            per_key = self._index.setdefault(ident[0], {})
            if route is None:
                per_key.pop(ident, None)
            else:
                per_key[ident] = route
            keys.add(ident[0])
        with self._lock:
            for key in keys:
                routes = self._index[key]
                gone = {r.endpoint for r in self._by_key.get(key, ())} - {r.endpoint for r in routes.values()}
                for endpoint in gone:  # what the policy learned of an instance that left
                    self._policy.forget(endpoint, key)
                self._by_key[key] = tuple(sorted(routes.values()))
                if not routes:
                    del self._index[key]
                for r in routes.values():  # listed again as answering: no longer suspect
                    self._suspect.pop(r.endpoint, None)
            self._applied = (change.epoch, change.version)
            self.updates += 1

    # ---- reporting the load -------------------------------------------------

    def _report(self) -> None:
        """Send this router's requests in flight per instance to the coordinator
        when they change (at most one report per REPORT_GAP) and every
        ``report_every`` seconds while there are any; take back the others'.
        One report at a time: each waits for the last one's answer, so a slow
        coordinator gets fewer, never a pile."""
        seq = 0
        sent: tuple[dict[tuple[str, str, int], int], dict[str, int]] | None = ({}, {})  # None: send again
        sent_applied: tuple[str, int] | None = None
        sent_at = 0.0
        failures = 0
        while True:
            self._load_changed.wait(self._report_every)
            self._load_changed.clear()
            if self._stopped.is_set():
                break
            with self._lock:  # the counts and the table they were chosen from, together
                counts, queued, applied = dict(self._by_instance), dict(self._queued + self._waiting), self._applied
            now = time.monotonic()
            idle = not counts and not queued
            # Due: every report_every while busy; while idle, often enough that
            # the coordinator keeps hearing which table this router applied (a
            # drain waits for every router it knows of — an idle one must not
            # fall out of its book and choose the old table unseen).
            due = now - sent_at >= (self._idle_every if idle else self._report_every)
            if (counts, queued) == sent and applied == sent_applied and not due:
                continue  # nothing new, and not yet due
            seq += 1
            try:
                others = self._cluster._handle.report_load.remote(
                    self.reporter, seq, counts, False, applied, queued).future().result(
                    timeout=max(5.0, 3 * self._report_every))
            except Exception as exc:  # restarting or slow: send the count again on the next round
                failures += 1
                if failures == 1:
                    log.warning("load report: the coordinator did not take it (%s); sending again", exc)
                sent = None
                if isinstance(exc, RayError):
                    self._cluster._reresolve()
                time.sleep(min(self._report_every, 0.1 * 2 ** min(failures, 6)))
                continue
            failures = 0
            sent, sent_applied, sent_at = (counts, queued), applied, now
            with self._lock:
                self._others = others
                self.reports += 1
            time.sleep(REPORT_GAP)
        try:  # stopped: this router's requests count for nothing any more (else they expire)
            self._cluster._handle.report_load.remote(self.reporter, seq + 1, {}, True)
        except Exception as exc:  # Ray shutting down: the coordinator lets the count expire
            log.debug("load report: goodbye not sent: %s", exc)

    # ---- holding requests for a model scaled to zero ------------------------

    async def hold(self, key: str) -> float:
        """With no instance of ``key`` listed: if its deployment scales from
        zero, hold (counted as queued in the reports — the demand that starts
        a replica) until one is routable or the coordinator's
        ``from_zero_timeout_s`` passes; the seconds held (0: not held)."""
        wait = await self._hold_for(key)
        if wait <= 0:
            return 0.0
        with self._lock:
            if sum(self._queued.values()) >= MAX_HELD:
                return 0.0
            self._queued[key] += 1
            self._load_changed.set()
        started = time.monotonic()
        try:
            while not self._by_key.get(key) and time.monotonic() - started < wait and not self._stopped.is_set():
                await asyncio.sleep(HOLD_LOOK)
        finally:
            with self._lock:
                self._queued[key] -= 1
                if self._queued[key] <= 0:
                    del self._queued[key]
                self._load_changed.set()
        return max(time.monotonic() - started, 1e-9)

    async def _hold_for(self, key: str) -> float:
        known = self._hold_known.get(key)
        now = time.monotonic()
        if known is not None and known[1] > now:
            return known[0]
        try:
            wait = float(await asyncio.wait_for(self._cluster._handle.hold_for.remote(key), HOLD_ASK_WAIT))
        except (RayError, TimeoutError) as exc:  # the coordinator restarting: fail as without holding
            log.debug("hold: the coordinator did not answer for %s: %s", key, exc)
            return 0.0
        if len(self._hold_known) >= HOLD_KNOWN_MAX:  # model names come from callers: bounded
            self._hold_known.clear()
        self._hold_known[key] = (wait, now + HOLD_KNOWN_FOR)
        return wait

    # ---- flow control's queues ----------------------------------------------

    def gate(self, settings: FlowSettings) -> FlowGate:
        """The flow gate every ``RayWorkerManager`` of this coordinator in this
        process shares (one queue and one fair share between their tenants,
        whatever loop or thread calls), made on first use and again if the
        settings change; what waits in it is reported as queued."""
        with self._lock:
            if self._gate is None or self._gate[0] != settings:
                self._gate = (settings, FlowGate(settings.policy(), demand=self.waiting))
            return self._gate[1]

    def waiting(self, key: str, change: int) -> None:
        """``change`` more requests wait for ``key`` under flow control (a
        gate of this process): reported as queued, like the held ones — the
        demand the autoscaler adds to the model's load."""
        with self._lock:
            self._waiting[key] += change
            if self._waiting[key] <= 0:
                del self._waiting[key]
            self._load_changed.set()

    # ---- choosing ---------------------------------------------------------

    def routes(self, key: str) -> tuple[Route, ...]:
        return self._by_key.get(key, ())

    def pick(self, key: str, exclude: set[tuple[str, int]] = frozenset(),  # type: ignore[assignment]
             limit: int | None = None, claim: bool = False, prompt: str | None = None) -> Route | None:
        """An instance of ``key`` for one request (see :meth:`choice`)."""
        chosen = self.choice(key, exclude, limit, claim, prompt)
        return None if chosen is None else chosen[0]

    def choice(self, key: str, exclude: set[tuple[str, int]] = frozenset(),  # type: ignore[assignment]
               limit: int | None = None, claim: bool = False,
               prompt: str | None = None) -> tuple[Route, Reason] | None:
        """An instance of ``key`` for one request, by the model's routing policy
        (``prompt``: the rendered prompt, for the cache-aware one), and why it
        was chosen; none of ``exclude`` nor any with ``limit`` requests in flight
        from this process; suspects only when nothing else is left.
        ``claim=True`` also counts the request in flight (in the same step, so
        concurrent picks cannot overshoot ``limit``)."""
        now = time.monotonic()
        with self._lock:
            # Read under the lock, with the claim below: a report (which reads
            # the counts and the table's position together) never shows a table
            # without an instance and, after it, a request chosen from the older one.
            routes = [r for r in self._by_key.get(key, ()) if r.endpoint not in exclude]
            if limit is not None:
                routes = [r for r in routes if self._in_flight[r.endpoint] < limit]
            trusted = [r for r in routes if self._suspect.get(r.endpoint, 0.0) <= now]
            pool = trusted or routes
            others = self._others
            chosen = self._policy.choose(key, [
                Candidate(r.endpoint, r.weight, self._by_instance[(key, *r.endpoint)],
                          others.get((key, *r.endpoint), 0))
                for r in pool], prompt)
            if chosen is None:
                return None
            route = pool[chosen.index]
            if claim:
                self._claim(key, route.endpoint)
            return route, chosen.reason

    def record(self, key: str, endpoint: tuple[str, int], prompt: str | None) -> None:
        """A request with ``prompt`` went to ``endpoint`` (the cache-aware
        policy learns that its prefix is cached there)."""
        if prompt:
            with self._lock:
                self._policy.record(key, endpoint, prompt)

    def at_limit(self, key: str, limit: int) -> list[tuple[str, int]]:
        """The instances of ``key`` with ``limit`` requests in flight from this process."""
        with self._lock:
            return [r.endpoint for r in self._by_key.get(key, ()) if self._in_flight[r.endpoint] >= limit]

    def endpoints(self) -> set[tuple[str, int]]:
        """Every endpoint listed now, or with a request in flight."""
        with self._lock:
            return {r.endpoint for routes in self._by_key.values() for r in routes} | set(self._in_flight)

    def _claim(self, key: str, endpoint: tuple[str, int]) -> None:  # under the lock
        self._in_flight[endpoint] += 1
        self._by_instance[(key, *endpoint)] += 1
        self._load_changed.set()

    def begin(self, key: str, endpoint: tuple[str, int]) -> None:
        with self._lock:
            self._claim(key, endpoint)

    def end(self, key: str, endpoint: tuple[str, int]) -> None:
        with self._lock:
            for counter, item in ((self._in_flight, endpoint), (self._by_instance, (key, *endpoint))):
                counter[item] -= 1
                if counter[item] <= 0:
                    del counter[item]
            self._load_changed.set()

    def suspect(self, endpoint: tuple[str, int]) -> None:
        """A connection to it failed: skip it until the table says it answers."""
        with self._lock:
            self._suspect[endpoint] = time.monotonic() + self._suspect_for

    def in_flight(self) -> dict[tuple[str, int], int]:
        """This process's requests in flight, per worker."""
        with self._lock:
            return dict(self._in_flight)

    def others_in_flight(self) -> dict[tuple[str, str, int], int]:
        """What the other callers had in flight per (model@type, host, port), as
        the coordinator last answered this router's report."""
        with self._lock:
            return dict(self._others)


