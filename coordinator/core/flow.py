"""Flow control, decided purely: which waiting request runs next when a
model's capacity is taken, and which are refused.

:class:`FlowScheduler` admits requests up to a **capacity per pool** (a pool
is a model: each model is served by its own instances, so a backlog on a slow
model must not hold back an idle one, as one global capacity would — llm-d
likewise runs its flow control per pool of model servers). Past it a request
waits in a **bounded queue with a deadline** each.

Why this module is long: the scheduler's state (pools, tenants' counters,
queues by priority, deadlines) and the four things done to it (offer,
release, expire, and the admissions and push-outs they cause) are one
algorithm whose invariants hold only together; its docstring is the spec
the table and property tests check.

When a place frees, the next to run is chosen by

1. **strict priority**: a higher ``priority`` first (a tenant that keeps a
   higher priority busy can starve a lower one — only until the lower one's
   deadline, which bounds every wait);
2. within a priority, **weighted fair sharing between tenants**: each
   tenant has a counter per pool of the cost it was served divided by its
   weight, and the tenant with the lowest counter goes next (first come first
   served within a tenant). This is start-time fair queuing (Goyal, Vin and
   Cheng, 1996) in the form of VTC's virtual token counters ("Fairness in
   Serving Large Language Models", Sheng et al., OSDI 2024; AIBrix routes
   with it as ``vtc-basic``): a tenant that becomes backlogged has its counter
   lifted to the pool's virtual time (the counter of the last admission), so
   time it spent idle is not credit it can spend starving the others later.

A tenant may also be limited in requests in flight (over every pool; more
wait) and in requests waiting (more are refused at once).

Cost is whatever the caller measures: this module only adds it up. The
gateway charges tokens — the prompt's estimated tokens when a request is
admitted, then what the request really cost (prompt and output) when it is
released, as VTC counts tokens served — because requests are not alike: one
long generation holds a place as long as many short ones, and sharing by
request count would give a tenant of long generations many times its share.
Envoy's and nginx's per-key limits are rates (token and leaky buckets): they
refuse a key over its rate even when the fleet is idle, and share nothing
between keys when it is full; llm-d's flow control queues per tenant and
priority band and cycles through tenants round robin by request (VTC is an
open proposal there).

**The bound**: while tenants stay backlogged in a pool, the served cost over
weight of any two differs by at most the largest single cost over weight
(one admission), and no request waits past its deadline. When the queue is
full, the request given up is of the lowest priority waiting, of the tenant
that holds the most of the pool (waiting and in flight) for its weight, its
newest — the arrival itself when that is its own tenant, or on a tie — so a
flood from one tenant pushes out its own requests, not a quiet tenant's
(fq_codel drops from its fattest flow the same way).

Time is passed in (``now``, monotonic seconds) and every call first refuses
what is past its deadline, so the scheduler never admits an overdue request
and needs no timer of its own. Each admission scans the tenants backlogged in
its pool: fine for the tens or hundreds of tenants an API key list holds.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

#: Why a request was refused.
Reason = Literal["queue_full", "displaced", "deadline", "tenant_limit"]
#: Characters per token of English text, roughly (OpenAI's rule of thumb):
#: the gateway has no tokenizer, and only ranks tenants' usage with it.
CHARS_PER_TOKEN = 4


def tokens_of(chars: int) -> float:
    """A rough token count of ``chars`` characters (at least 1: every request costs)."""
    return max(1.0, chars / CHARS_PER_TOKEN)


def tokens_spent(prompt_chars: int, output_chars: int, total_tokens: int | None) -> float:
    """What a request cost in tokens: the worker's count when it reported one,
    else an estimate from the characters in and out."""
    if total_tokens:
        return float(total_tokens)
    return tokens_of(prompt_chars + output_chars)


@dataclass(frozen=True)
class Share:
    """What one tenant gets: ``weight`` against the others' when they compete,
    and optional limits on its requests in flight (over every pool) and
    waiting."""

    weight: float = 1.0
    max_in_flight: int | None = None
    max_queued: int | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"a tenant's weight must be > 0, not {self.weight}")


@dataclass(frozen=True)
class FlowPolicy:
    """The scheduler's settings: places per pool (``capacity``, or the pool's
    own in ``capacities``), requests waiting per pool at most, and each
    tenant's :class:`Share` (``default_share`` for a tenant not named)."""

    capacity: int
    max_queued: int
    capacities: Mapping[str, int] = field(default_factory=dict)
    shares: Mapping[str, Share] = field(default_factory=dict)
    default_share: Share = Share()

    def __post_init__(self) -> None:
        if self.capacity < 1 or any(c < 1 for c in self.capacities.values()):
            raise ValueError("a pool's capacity must be at least 1")
        if self.max_queued < 0:
            raise ValueError("max_queued must be >= 0")
        # frozen means frozen: a caller's dict changed later must not change the policy
        object.__setattr__(self, "capacities", MappingProxyType(dict(self.capacities)))
        object.__setattr__(self, "shares", MappingProxyType(dict(self.shares)))

    def capacity_of(self, pool: str) -> int:
        return self.capacities.get(pool, self.capacity)

    def share_of(self, tenant: str) -> Share:
        return self.shares.get(tenant, self.default_share)


@dataclass(frozen=True)
class FlowRequest:
    """One request offered: who sends it (``tenant``), where it goes (``pool``),
    its ``priority`` (higher first), its ``cost`` (charged when admitted) and
    the ``deadline`` past which it no longer waits."""

    id: Hashable
    tenant: str
    pool: str
    priority: int = 0
    cost: float = 1.0
    deadline: float = float("inf")


@dataclass(frozen=True)
class Admitted:
    request: FlowRequest


@dataclass(frozen=True)
class Queued:
    request: FlowRequest


@dataclass(frozen=True)
class Refused:
    request: FlowRequest
    reason: Reason


Decision = Admitted | Queued | Refused


@dataclass(frozen=True)
class Offer:
    """What :meth:`FlowScheduler.offer` decided: the offered request's
    ``verdict``, and what it caused for others (overdue ones refused, one
    pushed out of a full queue)."""

    verdict: Admitted | Queued | Refused
    others: tuple[Refused, ...] = ()


@dataclass
class _Waiting:
    request: FlowRequest
    seq: int  # arrival order: first come first served within a tenant, and the tie-break


@dataclass
class _Flow:
    """One tenant in one pool."""

    counter: float = 0.0  # cost served / weight, lifted to the pool's virtual time when it becomes backlogged
    in_flight: int = 0
    waiting: dict[int, deque[_Waiting]] = field(default_factory=dict)  # by priority, each first come first served

    def top(self) -> int:
        return max(self.waiting)

    def newest(self, priority: int) -> _Waiting:
        return self.waiting[priority][-1]


@dataclass
class _Pool:
    vtime: float = 0.0  # the counter of the last admission: where a newly backlogged tenant starts
    in_flight: int = 0
    queued: int = 0
    flows: dict[str, _Flow] = field(default_factory=dict)


@dataclass
class _Load:
    """One tenant over every pool: what its limits count."""

    in_flight: int = 0
    queued: int = 0


@dataclass
class _Running:
    request: FlowRequest
    charged: float  # cost / weight added to the tenant's counter on admission


class FlowScheduler:
    """Admission, queueing and fair sharing for one caller (a gateway
    replica). Not thread-safe: one event loop calls it."""

    def __init__(self, policy: FlowPolicy) -> None:
        self.policy = policy
        self._pools: dict[str, _Pool] = {}
        self._loads: dict[str, _Load] = {}
        self._waiting: dict[Hashable, _Waiting] = {}
        self._running: dict[Hashable, _Running] = {}
        self._deadlines: list[tuple[float, int, Hashable]] = []  # a heap; entries of gone requests skipped
        self._seq = itertools.count()

    # ---- what callers do ------------------------------------------------

    def offer(self, request: FlowRequest, now: float) -> Offer:
        """Admit ``request`` now, queue it, or refuse it (``tenant_limit``: its
        tenant has ``max_queued`` waiting; ``queue_full``: its pool's queue is
        full of requests that rank before it). Raises ValueError for an id
        already known or a cost that is not > 0."""
        if request.id in self._waiting or request.id in self._running:
            raise ValueError(f"request {request.id!r} was already offered")
        if not request.cost > 0:
            raise ValueError(f"a request's cost must be > 0, not {request.cost}")
        others = self._expire(now)
        pool = self._pools.setdefault(request.pool, _Pool())
        flow = pool.flows.setdefault(request.tenant, _Flow())
        if not flow.waiting:  # newly backlogged: idle time is no credit
            flow.counter = max(flow.counter, pool.vtime)
        self._enqueue(request, pool, flow)
        admitted = self._dispatch(request.pool, pool)
        if admitted:
            # Before the offer no waiting request could run (every call fills
            # what it frees), so the one admitted now is this one.
            assert [a.request for a in admitted] == [request], admitted
            return Offer(admitted[0], tuple(others))
        verdict, pushed = self._bound(request, pool)
        return Offer(verdict, tuple(others + pushed))

    def release(self, request_id: Hashable, now: float, cost: float | None = None) -> list[Decision]:
        """``request_id`` is done: if it ran, its place frees (and with
        ``cost``, its tenant is charged what it really cost instead of what
        it was charged on admission); if it waited, it leaves the queue (its
        client went away). The requests this admits, and those refused for
        their deadline. Unknown ids (already released, refused) are ignored."""
        out: list[Decision] = list(self._expire(now))
        running = self._running.pop(request_id, None)
        if running is not None:
            req = running.request
            pool = self._pools[req.pool]
            flow = pool.flows[req.tenant]
            pool.in_flight -= 1
            flow.in_flight -= 1
            self._loads[req.tenant].in_flight -= 1
            if cost is not None:
                flow.counter += cost / self.policy.share_of(req.tenant).weight - running.charged
            # Its pool has a free place; its tenant may be under its limit again in every pool.
            for name, other in list(self._pools.items()):
                out += self._dispatch(name, other)
            self._tidy(req)
        elif request_id in self._waiting:
            entry = self._waiting[request_id]
            self._unqueue(entry)
            self._tidy(entry.request)
        return out

    def expire(self, now: float) -> list[Refused]:
        """Refuse every waiting request whose deadline is ``now`` or before."""
        return self._expire(now)

    # ---- what it holds --------------------------------------------------

    def queued(self, tenant: str | None = None, pool: str | None = None) -> int:
        """Requests waiting (of ``tenant``, in ``pool``, or all)."""
        if pool is None:
            return len(self._waiting) if tenant is None else self._load(tenant).queued
        return sum(1 for w in self._waiting.values()
                   if (tenant is None or w.request.tenant == tenant) and (pool is None or w.request.pool == pool))

    def in_flight(self, tenant: str | None = None, pool: str | None = None) -> int:
        """Requests admitted and not released (of ``tenant``, in ``pool``, or all)."""
        if pool is None:
            return len(self._running) if tenant is None else self._load(tenant).in_flight
        return sum(1 for r in self._running.values()
                   if (tenant is None or r.request.tenant == tenant) and (pool is None or r.request.pool == pool))

    def _load(self, tenant: str) -> _Load:
        return self._loads.get(tenant) or _Load()

    # ---- the algorithm --------------------------------------------------

    def _enqueue(self, request: FlowRequest, pool: _Pool, flow: _Flow) -> None:
        entry = _Waiting(request, next(self._seq))
        flow.waiting.setdefault(request.priority, deque()).append(entry)
        pool.queued += 1
        self._loads.setdefault(request.tenant, _Load()).queued += 1
        self._waiting[request.id] = entry
        heapq.heappush(self._deadlines, (request.deadline, entry.seq, request.id))

    def _unqueue(self, entry: _Waiting) -> None:
        req = entry.request
        pool = self._pools[req.pool]
        flow = pool.flows[req.tenant]
        line = flow.waiting[req.priority]
        line.remove(entry)  # usually the head (admitted) or the tail (pushed out)
        if not line:
            del flow.waiting[req.priority]
        pool.queued -= 1
        self._loads[req.tenant].queued -= 1
        del self._waiting[req.id]

    def _may_run(self, tenant: str) -> bool:
        limit = self.policy.share_of(tenant).max_in_flight
        return limit is None or self._loads[tenant].in_flight < limit

    def _dispatch(self, name: str, pool: _Pool) -> list[Admitted]:
        """Fill ``pool``'s free places: the highest priority first, then the
        tenant with the lowest counter, then the oldest request."""
        admitted: list[Admitted] = []
        capacity = self.policy.capacity_of(name)
        while pool.in_flight < capacity and pool.queued:
            best: tuple[tuple[int, float, int], _Flow, _Waiting] | None = None
            for tenant, flow in pool.flows.items():
                if not flow.waiting or not self._may_run(tenant):
                    continue
                priority = flow.top()
                head = flow.waiting[priority][0]
                rank = (-priority, flow.counter, head.seq)
                if best is None or rank < best[0]:
                    best = (rank, flow, head)
            if best is None:
                break  # every waiting tenant is at its own limit
            _, flow, head = best
            self._unqueue(head)
            req = head.request
            charged = req.cost / self.policy.share_of(req.tenant).weight
            pool.vtime = max(pool.vtime, flow.counter)
            flow.counter += charged
            flow.in_flight += 1
            pool.in_flight += 1
            self._loads[req.tenant].in_flight += 1
            self._running[req.id] = _Running(req, charged)
            admitted.append(Admitted(req))
        return admitted

    def _bound(self, request: FlowRequest, pool: _Pool) -> tuple[Queued | Refused, list[Refused]]:
        """``request`` waits: hold its tenant's and its pool's queue bounds."""
        limit = self.policy.share_of(request.tenant).max_queued
        if limit is not None and self._loads[request.tenant].queued > limit:
            self._unqueue(self._waiting[request.id])
            self._tidy(request)
            return Refused(request, "tenant_limit"), []
        if pool.queued <= self.policy.max_queued:
            return Queued(request), []
        victim = self._victim(pool)
        self._unqueue(victim)
        self._tidy(victim.request)
        if victim.request.id == request.id:
            return Refused(request, "queue_full"), []
        return Queued(request), [Refused(victim.request, "displaced")]

    def _victim(self, pool: _Pool) -> _Waiting:
        """The request a full queue gives up: of the lowest priority waiting,
        of the tenant holding the most of the pool (waiting and in flight) for
        its weight, the newest (ties: the newest, so an arrival never pushes
        out its equal)."""
        lowest = min(p for flow in pool.flows.values() for p in flow.waiting)
        worst: tuple[tuple[float, int], _Waiting] | None = None
        for tenant, flow in pool.flows.items():
            line = flow.waiting.get(lowest)
            if line:
                held = flow.in_flight + sum(len(waiting) for waiting in flow.waiting.values())
                rank = (held / self.policy.share_of(tenant).weight, line[-1].seq)
                if worst is None or rank > worst[0]:
                    worst = (rank, line[-1])
        assert worst is not None
        return worst[1]

    def _expire(self, now: float) -> list[Refused]:
        refused: list[Refused] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, seq, request_id = heapq.heappop(self._deadlines)
            entry = self._waiting.get(request_id)
            if entry is not None and entry.seq == seq:
                self._unqueue(entry)
                self._tidy(entry.request)
                refused.append(Refused(entry.request, "deadline"))
        return refused

    def _tidy(self, request: FlowRequest) -> None:
        """Forget what holds nothing: a tenant's flow once it waits for and
        runs nothing and has no usage above the pool's virtual time (it would
        start there anyway), a pool once it is idle, a tenant's load once it
        is zero — so state stays bounded by what is in flight and waiting."""
        pool = self._pools.get(request.pool)
        if pool is not None:
            flow = pool.flows.get(request.tenant)
            if flow is not None and not flow.waiting and not flow.in_flight and flow.counter <= pool.vtime:
                del pool.flows[request.tenant]
            if not pool.in_flight and not pool.queued:
                del self._pools[request.pool]
        load = self._loads.get(request.tenant)
        if load is not None and not load.in_flight and not load.queued:
            del self._loads[request.tenant]
