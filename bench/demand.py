"""Following demand: an autoscaled deployment beside fixed fleets under load
traces (issue #21, point 5, the autoscaling half).

Eight reference worker managers (processes) start empty and register with a
coordinator's embedded registry; the keeper places every replica. Their
models take 10 s to load (``--load-s 10``: a cold start) and run the
cost-model engine with 4 request slots each (``--slots 4``): a fifth request
on a replica waits for a slot, so the time to first token (TTFT) grows when a
fleet is too small. An answer streams 10 chunks 0.2 s apart (~2.1 s with the
engine's decode): a request that waits behind a whole stream misses 2 s of
TTFT. The routers choose by load (``power_of_two``): the callers' prompts
share no prefix, and the default ``cache_aware`` policy would keep each
caller on the replica that cached its prompt, new replicas or not.

**Contenders**, side by side in one run (four models on the same worker
managers, each with its own engine slots, each fed the same trace at the same
moments by its own callers):

- **fixed at max**: 7 replicas, the fleet the peak needs (20 in flight over
  ``target_in_flight`` 3 of the 4 slots);
- **fixed at min**: 1 replica;
- **autoscaled**: ``Autoscale(min_replicas=1, max_replicas=7,
  target_in_flight=3, upscale_delay_s=5, downscale_delay_s=30)``; no
  ``startup_s``: the keeper times the model's cold start (its first start
  when the contenders are deployed);
- **autoscaled, 60 s down**: the same with ``downscale_delay_s=60``: what a
  longer wait before a scale-down costs and saves.

A ``--quick`` run's traces and downscale delays are a quarter as long.

**Traces** (concurrent streams through ``RayWorkerManager.generate_stream``,
closed loop: each of up to 20 callers per contender streams back to back
while the trace wants it, and finishes its stream when it no longer does;
tests/streamed_load.py, in threads of this process):

- **step**: 2, then 20, then 2 again (60 s, 120 s, 120 s);
- **spike**: 2, then 20 for 20 s — about what an upscale delay plus a cold
  start take —, then 2 (60 s, 20 s, 100 s);
- **sine**: from 2 up to 20 and back, two periods of 120 s.

Each trace begins with the autoscaled deployment back at its minimum. A
**from zero** phase comes first: a deployment with ``min_replicas: 0`` and no
replica gets one request, held by the router while a replica starts; timed
to its first token (``--from-zero`` times, scaling back to zero between).

Figures per trace and contender:

- **TTFT ≤ 2 s**: the share of requests (streams begun during the trace; a
  failed one counts as late) whose first token came within 2 s, counted
  **after the first cold start**: from when the (first) autoscaled
  deployment's first replica started for the trace's first rise was serving —
  the same cut for every contender, so all are judged over the same seconds; and over
  the whole trace. TTFT p50 and p95 (after the cut, answered requests);
- **replica-minutes**: replicas held over the trace — the count wanted (a
  replica that loads holds its GPU) or, when more, the instances still
  serving or draining (a replica being drained holds it until it stops) —
  sampled every 0.5 s; and as a share of the fixed-max fleet's;
- **scale actions per load change**: each autoscaled deployment's
  ``autoscale`` events from the trace's start until it was back at its
  minimum (a scale-down the trace set off may come after its end), over the
  trace's load changes (step, spike: one up, one down; sine: one rise and one
  fall per period); and how long after the trace's end it was back at its
  minimum, with the replica-minutes held meanwhile;
- **rise → decided / new replica**: from each rise of the load to the
  autoscaler's decision (its event), and to the first new replica serving
  (``cluster.status()``: healthy and not draining, sampled every 0.5 s).

On the spike the new replicas come about when the spike ends: its story is
in the share over the whole trace, and in what the replicas cost after it.

Targets (the issue's, read for each autoscaled contender): on the step trace, ≥ 95 % of requests within 2 s
after the first cold start, with ≤ 60 % of the fixed-max fleet's
replica-minutes; ≤ 2 scale actions per load change; the first request from
zero answered (first token) within ``load_s`` + 1 s.

    python -m bench.demand [--from-zero 3] [--quick]   # or: make demand

Writes bench/results/demand.json and bench/results/demand.png (``--quick``, a
smoke run with short traces: demand-quick.json and demand-quick.png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("RAY_AUTH_MODE", "token")
# Importing tests/conftest.py turns Ray's token authentication on (for the
# tests); this run keeps the mode it was started with.
_auth_mode = os.environ["RAY_AUTH_MODE"]

import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import coordinator  # noqa: E402
from bench.detection import spawn  # noqa: E402
from bench.rollout import CapacitySampler  # noqa: E402
from coordinator.core.autoscale import Autoscale  # noqa: E402
from coordinator.core.deployments import Deployment, DeploymentEvent  # noqa: E402
from tests.conftest import wait_until  # noqa: E402
from tests.streamed_load import PROMPT, Stream, StreamedLoad, journal, stream_once  # noqa: E402

os.environ["RAY_AUTH_MODE"] = _auth_mode

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
console = Console()

NAMESPACE = "bench-demand"
WORKERS = 8
LOAD_S = 10.0
SLOTS = 4
CHUNKS, CHUNK_DELAY = 10, 0.2
#: The engine's default cost of each chunk, on top of CHUNK_DELAY.
DECODE_S = 0.010
STREAM_S = CHUNKS * (CHUNK_DELAY + DECODE_S)
TTFT_OK = 2.0
LOW, HIGH = 2, 20
#: Requests in flight per replica the autoscaler aims at: 3 of the 4 slots,
#: a slot of headroom for the routers' imbalance (power of two choices is
#: not least-loaded).
TARGET_IN_FLIGHT = 3
MIN_REPLICAS, MAX_REPLICAS = 1, math.ceil(HIGH / TARGET_IN_FLIGHT)
SIM = {"provider": "proxy/sim"}
SAMPLE_EVERY = 0.5
PAUSE_AFTER_FAILURE = 0.2
STARTUP = "/api/worker/models/startup"
#: The contenders' load begins this long after their callers' threads start
#: (each thread's event loop and router up), so that all three begin at once.
LEAD_S = 1.0


# ---- the traces ------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    name: str
    seconds: float
    #: Concurrent streams wanted ``t`` seconds into the trace (0 <= t < seconds).
    level: Callable[[float], int]
    #: The load changes the figures are counted per: (seconds in, "up" or "down").
    changes: tuple[tuple[float, str], ...]
    description: str


def phases(name: str, spec: list[tuple[float, int]]) -> Trace:
    """A trace of constant phases: ``spec`` is (seconds, concurrent streams) each."""
    bounds, t = [], 0.0
    for seconds, level in spec:
        bounds.append((t, t + seconds, level))
        t += seconds

    def level(at: float) -> int:
        return next((n for begin, end, n in bounds if begin <= at < end), 0)

    changes = tuple((b[0], "up" if b[2] > a[2] else "down") for a, b in zip(bounds, bounds[1:]) if a[2] != b[2])
    return Trace(name, t, level, changes, ", ".join(f"{n} for {s:g} s" for s, n in spec))


def sine(name: str, period: float, periods: int) -> Trace:
    """From LOW up to HIGH and back, ``periods`` times: a rise from each trough, a fall from each peak."""

    def level(at: float) -> int:
        return round(LOW + (HIGH - LOW) * (1 - math.cos(2 * math.pi * at / period)) / 2)

    changes = tuple(c for k in range(periods) for c in ((k * period, "up"), ((k + 0.5) * period, "down")))
    return Trace(name, period * periods, level, changes,
                 f"{LOW} up to {HIGH} and back, {periods} period(s) of {period:g} s")


def traces(quick: bool) -> tuple[Trace, ...]:
    if quick:
        return (phases("step", [(10, LOW), (35, HIGH), (25, LOW)]),
                phases("spike", [(10, LOW), (10, HIGH), (20, LOW)]),
                sine("sine", 40, 1))
    return (phases("step", [(60, LOW), (120, HIGH), (120, LOW)]),
            phases("spike", [(60, LOW), (20, HIGH), (100, LOW)]),
            sine("sine", 120, 2))


# ---- the contenders --------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    deployment: Deployment

    @property
    def model(self) -> str:
        return self.deployment.model


def policy(quick: bool, downscale_delay_s: float = 30) -> Autoscale:
    """The autoscaled contenders' policy, the cold start left to the keeper
    to time (no ``startup_s``: the models' first start, ~10 s). A quick
    run's traces are a quarter as long as the full run's, and so are its
    downscale delays (else they would not scale down within them)."""
    return Autoscale(min_replicas=MIN_REPLICAS, max_replicas=MAX_REPLICAS, target_in_flight=TARGET_IN_FLIGHT,
                     upscale_delay_s=5,
                     downscale_delay_s=downscale_delay_s / 4 if quick else downscale_delay_s)


def contenders(quick: bool) -> tuple[Contender, ...]:
    """The fleet fixed at max first (what replica-minutes are compared to);
    the first autoscaled one is the one the issue's targets are read from."""
    return (
        Contender(f"fixed at max ({MAX_REPLICAS})", Deployment(model="fixed-max", replicas=MAX_REPLICAS, params=SIM)),
        Contender(f"fixed at min ({MIN_REPLICAS})", Deployment(model="fixed-min", replicas=MIN_REPLICAS, params=SIM)),
        Contender(f"autoscaled ({MIN_REPLICAS}..{MAX_REPLICAS})",
                  Deployment(model="auto", replicas=MIN_REPLICAS, params=SIM, autoscale=policy(quick))),
        Contender(f"autoscaled, 60 s down ({MIN_REPLICAS}..{MAX_REPLICAS})",
                  Deployment(model="auto-60", replicas=MIN_REPLICAS, params=SIM,
                             autoscale=policy(quick, downscale_delay_s=60))),
    )


#: The from-zero phase's deployment: no replica until a request asks for one,
#: back to zero after 10 s without any.
FROM_ZERO = Deployment(model="cold", replicas=0, params=SIM, autoscale=Autoscale(
    min_replicas=0, max_replicas=1, target_in_flight=TARGET_IN_FLIGHT, upscale_delay_s=5, downscale_delay_s=10,
    downscale_to_zero_delay_s=10, from_zero_timeout_s=60))


# ---- what is sampled -------------------------------------------------------


class Shape(NamedTuple):
    """One contender's deployment at one moment."""

    wanted: int  # the deployment's replicas (what the autoscaler wants now)
    serving: int  # healthy and not draining: in the route table
    draining: int
    load: int  # requests in flight and held, as the coordinator sums the callers' reports

    @property
    def held(self) -> int:
        """Replicas holding a GPU: those wanted (one loading holds its GPU),
        or more while extras are still serving or draining."""
        return max(self.wanted, self.serving + self.draining)


class Fleet:
    """Samples every contender's shape (for CapacitySampler) and keeps every
    deployment event it sees: a status keeps only the newest ten."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self.events: dict[str, dict[tuple, DeploymentEvent]] = {m: {} for m in models}

    def sample(self, cluster: coordinator.Cluster) -> tuple[Shape, ...]:
        status, deployments = cluster.status(), {d.model: d for d in cluster.deployments()}
        shapes = []
        for model in self.models:
            rows = [r for r in status.instances if r.model == model]
            d = deployments.get(model)
            if d is not None:
                for e in d.events:
                    self.events[model][(e.at, e.action, e.endpoint, e.message)] = e
            shapes.append(Shape(
                wanted=d.replicas if d is not None else 0,
                serving=sum(1 for r in rows if r.healthy and not r.draining),
                draining=sum(1 for r in rows if r.draining),
                load=sum(r.in_flight for r in rows) + status.waiting.get(f"{model}@llm", 0)))
        return tuple(shapes)

    def autoscale_events(self, model: str, begin: float, end: float) -> list[DeploymentEvent]:
        return sorted((e for e in self.events[model].values() if e.action == "autoscale" and begin <= e.at < end),
                      key=lambda e: e.at)


# ---- running a trace -------------------------------------------------------


@dataclass
class TraceRun:
    trace: Trace
    began: float  # wall clock: the trace's t = 0
    streams: dict[str, list[Stream]]  # per contender name
    #: How the contenders got back to their starting counts after it (see settle):
    #: what the trace set off lasts until then.
    settled: dict | None = None

    @property
    def ended(self) -> float:
        return self.began + self.trace.seconds

    @property
    def aftermath(self) -> float:
        """When what the trace set off was over: back at the starting counts (or given up on)."""
        return self.settled["at"] if self.settled else self.ended


def settle(cluster: coordinator.Cluster, fleet: Fleet, runners: tuple[Contender, ...], timeout: float) -> dict:
    """Wait until every contender has its starting count serving and nothing
    draining (the autoscaled one back at its minimum), at most ``timeout``
    seconds: a deployment that does not get there is a finding to report, and
    the trace runs anyway."""
    started = time.monotonic()
    want = [Shape(c.deployment.replicas, c.deployment.replicas, 0, 0) for c in runners]
    while (shapes := [s._replace(load=0) for s in fleet.sample(cluster)]) != want:
        if time.monotonic() - started > timeout:
            console.print(f"  [red]not settled within {timeout:g} s[/red]: {shapes}")
            return {"waited_s": round(time.monotonic() - started, 1), "settled": False, "at": time.time(),
                    "shapes": {c.name: s._asdict() for c, s in zip(runners, shapes)}}
        time.sleep(0.5)
    return {"waited_s": round(time.monotonic() - started, 1), "settled": True, "at": time.time()}


def run_trace(cluster: coordinator.Cluster, trace: Trace, runners: tuple[Contender, ...]) -> TraceRun:
    began = time.time() + LEAD_S

    def active(i: int) -> bool:
        at = time.time() - began
        return 0 <= at < trace.seconds and i < trace.level(at)

    loads = {c.name: StreamedLoad(cluster, c.model, HIGH, pause_after_failure=PAUSE_AFTER_FAILURE, active=active)
             for c in runners}
    with ExitStack() as stack:
        for load in loads.values():
            stack.enter_context(load)
        while (left := began + trace.seconds - time.time()) > 0:
            time.sleep(min(left, 10))
            at = time.time() - began
            console.print(f"  {trace.name}: {min(at, trace.seconds):.0f} / {trace.seconds:g} s, "
                          f"{trace.level(at) if at < trace.seconds else 0} streams wanted")
    # Leaving the stack: every caller finished the stream it was in.
    return TraceRun(trace, began, {name: list(load.streams) for name, load in loads.items()})


def from_zero(cluster: coordinator.Cluster, repeats: int, worker_ports: list[int]) -> list[dict]:
    """``repeats`` times: the FROM_ZERO deployment at zero, one streamed
    request; when it was answered, and where the time went: the autoscaler's
    decision, the startup's arrival at a worker and its end there (the model
    loaded and registered: the workers' journals), the start's return to the
    keeper, the replica serving."""
    fleet = Fleet([FROM_ZERO.model])
    cluster.deploy(FROM_ZERO)
    out: list[Stream] = []
    try:
        with CapacitySampler(cluster, fleet.sample, every=0.2) as sampler:
            for k in range(repeats):
                # At zero: nothing wanted, nothing serving (after the first: its delay to zero, then a drain).
                wait_until(lambda: fleet.sample(cluster)[0][:3] == (0, 0, 0),
                           timeout=FROM_ZERO.autoscale.downscale_to_zero_delay_s + 60, interval=0.2,
                           what="the from-zero deployment at zero")
                console.print(f"  from zero, request {k + 1} of {repeats}…")
                stream = asyncio.run(_one_request(cluster))
                out.append(stream)
        samples = list(sampler.samples)
    finally:
        cluster.undeploy(FROM_ZERO.model, shutdown=True)
    events = sorted(fleet.events[FROM_ZERO.model].values(), key=lambda e: e.at)
    # Read now: the traces' requests would push these calls out of the journals.
    startups = sorted((e for port in worker_ports for e in journal(port) if e["path"] == STARTUP
                       and json.loads(e["body"]).get("model") == FROM_ZERO.model), key=lambda e: e["t"])

    def since(stream: Stream, t: float | None) -> float | None:
        return None if t is None else round(t - stream.began, 2)

    rows = []
    for stream in out:
        window = [e for e in events if e.at >= stream.began]
        startup = next((e for e in startups if e["t"] >= stream.began), {})
        rows.append({
            "ok": stream.ok, "error": stream.error, "ttft_s": _round(stream.ttft, 2),
            "answered_in_full_s": round(stream.ended - stream.began, 2),
            "decided_s": since(stream, next((e.at for e in window if e.action == "autoscale"), None)),
            "startup_at_worker_s": since(stream, startup.get("t")),
            "startup_done_at_worker_s": since(stream, startup.get("t_end")),
            "start_returned_s": since(stream, next((e.at for e in window if e.action == "start"), None)),
            "serving_s": since(stream, next((t for t, shape in samples if t >= stream.began and shape.serving), None)),
        })
    return rows


async def _one_request(cluster: coordinator.Cluster) -> Stream:
    manager = coordinator.RayWorkerManager(cluster)
    try:
        return await stream_once(manager, {"model": FROM_ZERO.model,
                                           "messages": [{"role": "human", "content": PROMPT}]})
    finally:
        await manager.aclose()


# ---- the figures -----------------------------------------------------------


def shapes_of(samples: list[tuple], index: int, begin: float, end: float) -> list[tuple[float, Shape]]:
    return [(s[0], s[1 + index]) for s in samples if begin <= s[0] <= end]


def replica_minutes(points: list[tuple[float, Shape]], begin: float, end: float) -> float:
    """Replicas held, integrated over [begin, end): each sample's count holds until the next."""
    total = 0.0
    for (t, shape), (t_next, _) in zip(points, points[1:] + [(end, None)]):
        total += shape.held * max(0.0, min(t_next, end) - max(t, begin))
    return total / 60


def first_new_ready(points: list[tuple[float, Shape]], at: float) -> float | None:
    """When, after ``at``, more replicas served than at ``at`` (None: never in ``points``)."""
    before = [s.serving for t, s in points if t <= at]
    base = before[-1] if before else 0
    return next((t for t, s in points if t > at and s.serving > base), None)


def back_at_min(points: list[tuple[float, Shape]], end: float, minimum: int) -> float | None:
    """When, after ``end``, the count held came down to ``minimum`` for good (None: not in ``points``)."""
    after = [(t, s.held) for t, s in points if t >= end]
    if not after or after[-1][1] > minimum:
        return None
    above = [t for t, held in after if held > minimum]
    if not above:
        return end
    return next(t for t, held in after if t > above[-1])


def share(streams: list[Stream]) -> float | None:
    """The share answered with a first token within TTFT_OK (a failed stream is late)."""
    if not streams:
        return None
    return sum(1 for s in streams if s.ok and s.ttft is not None and s.ttft <= TTFT_OK) / len(streams)


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def scaled_up(event: DeploymentEvent) -> bool:
    """An autoscale event's message reads "a -> b replicas"."""
    before, after = (int(n) for n in re.findall(r"\d+", event.message)[:2])
    return after > before


def measure(run: TraceRun, runners: tuple[Contender, ...], samples: list[tuple], fleet: Fleet) -> dict:
    """One trace's figures per contender, and the cut (the first cold start's end)."""
    begin, end, aftermath = run.began, run.ended, run.aftermath
    rises = [begin + at for at, way in run.trace.changes if way == "up"]

    def followed(i: int, c: Contender) -> tuple:
        """An autoscaled contender's scale events, and when each rise was decided and first served."""
        # Replicas that start late in the trace may serve after its end: look until its aftermath is over.
        points = shapes_of(samples, i, begin - 2 * SAMPLE_EVERY, max(aftermath, end + 2 * LOAD_S))
        events = fleet.autoscale_events(c.model, begin, aftermath)
        ready_after = [first_new_ready(points, t) for t in rises]
        decided_after = [next((e.at for e in events if e.at >= t and scaled_up(e)), None) for t in rises]
        return points, events, ready_after, decided_after

    autos = {i: followed(i, c) for i, c in enumerate(runners) if c.deployment.autoscale is not None}
    # The cut: when the first autoscaled contender's first new replica served.
    first_ready = next(iter(autos.values()))[2] if autos else []
    cut = first_ready[0] if first_ready and first_ready[0] is not None else begin
    minutes = [replica_minutes(shapes_of(samples, i, begin - 2 * SAMPLE_EVERY, end), begin, end)
               for i in range(len(runners))]
    fixed_max = minutes[0]  # the first contender is the fleet fixed at max
    out: dict = {"cut_s": round(cut - begin, 2), "contenders": {}}
    for i, c in enumerate(runners):
        streams = [s for s in run.streams[c.name] if begin <= s.began < end]
        after = [s for s in streams if s.began >= cut]
        ttfts = [s.ttft for s in after if s.ok and s.ttft is not None]
        row = {
            "requests": len(streams), "requests_after_cut": len(after),
            "ttft_ok_after_cut": _round(share(after), 4), "ttft_ok_all": _round(share(streams), 4),
            "ttft_p50_s": _round(quantile(ttfts, 0.5), 2), "ttft_p95_s": _round(quantile(ttfts, 0.95), 2),
            "failed": sum(1 for s in streams if not s.ok),
            "replica_minutes": round(minutes[i], 2),
            "replica_minutes_vs_max": round(minutes[i] / fixed_max, 3) if fixed_max else None,
        }
        if i in autos:
            points, events, ready_after, decided_after = autos[i]
            tail = shapes_of(samples, i, end - 2 * SAMPLE_EVERY, aftermath)
            # The settle may see the minimum a sample before the sampler does; the
            # next trace begins low, at the minimum still, so a second more of samples tells.
            later = shapes_of(samples, i, end - 2 * SAMPLE_EVERY, aftermath + 2)
            at_min = back_at_min(later, end, c.deployment.autoscale.min_replicas)
            if at_min is None and run.settled and run.settled["settled"]:
                at_min = aftermath  # the last trace: the sampler stopped with the settle, which saw it
            row.update({
                # Counted until it was back at its minimum: a scale-down the trace set off may come after its end.
                "scale_actions": len(events), "load_changes": len(run.trace.changes),
                "scale_actions_per_change": round(len(events) / len(run.trace.changes), 2),
                "scale_events": [{"at_s": round(e.at - begin, 2), "change": e.message, "why": e.reason}
                                 for e in events],
                "rise_to_decision_s": [_round(None if t is None else t - r, 2) for r, t in zip(rises, decided_after)],
                "rise_to_new_replica_s": [_round(None if t is None else t - r, 2) for r, t in zip(rises, ready_after)],
                "back_at_min_after_end_s": None if at_min is None else round(max(0.0, at_min - end), 1),
                "back_at_min": at_min is not None,
                "replica_minutes_after_end": round(replica_minutes(tail, end, aftermath), 2),
            })
        out["contenders"][c.name] = row
    return out


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


# ---- the run ---------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from-zero", type=int, default=3, help="requests to a deployment at zero, one at a time")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: traces and downscale delays a quarter as long, one request from zero; "
                             "writes demand-quick.*")
    parser.add_argument("--only-from-zero", action="store_true",
                        help="the from-zero phase alone (no traces); writes demand-from-zero.json")
    args = parser.parse_args()
    if args.quick:
        args.from_zero = 1
    runners, plan = contenders(args.quick), traces(args.quick)
    started = time.monotonic()
    # address="local": a Ray of our own, never one someone else started on this machine.
    ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, logging_level="WARNING")
    worker_log = tempfile.NamedTemporaryFile("w", prefix="bench-demand-workers-", suffix=".log", delete=False)
    cluster: coordinator.Cluster | None = None
    workers: list = []
    runs: list[TraceRun] = []
    try:
        cluster = coordinator.start(
            {"registries": [{"kind": "embedded", "name": "fleet", "port": 0, "heartbeat_interval": 1}],
             "routing": {"policy": "power_of_two"}},
            name="demand", namespace=NAMESPACE)
        command = ["reference_worker", "--controller", cluster.registry_url(), "--heartbeat-interval", "1",
                   "--load-s", str(LOAD_S), "--chunks", str(CHUNKS), "--chunk-delay", str(CHUNK_DELAY),
                   "--slots", str(SLOTS)]
        with ThreadPoolExecutor(WORKERS) as pool:  # each waits for its process to listen: start them together
            workers = list(pool.map(lambda _: spawn(command, stderr=worker_log), range(WORKERS)))
        cluster.wait_for("WorkerManager", count=WORKERS, worker_type="service", timeout=60)
        # And their proxies up (each manager probed): eight actors starting
        # on two cores would otherwise slow the first request from zero.
        wait_until(lambda: sum(1 for r in cluster.status().instances
                               if r.model == "WorkerManager" and r.reachable) == WORKERS,
                   timeout=60, interval=0.5, what="every worker manager probed")

        console.print(f"from zero ({args.from_zero} request(s), a model that loads in {LOAD_S:g} s)…")
        zero = from_zero(cluster, args.from_zero, [port for _, port in workers])
        if args.only_from_zero:
            return _report_from_zero(zero, time.monotonic() - started)

        console.print("deploying the contenders…")
        cluster.deploy(*(c.deployment for c in runners), wait=True, timeout=120)
        fleet = Fleet([c.model for c in runners])
        with CapacitySampler(cluster, fleet.sample, every=SAMPLE_EVERY) as sampler:
            # A scale-down can take two windows (see the README): the first
            # goes no lower than the whole window asked, a queue's tail included.
            settle_within = 2 * max(c.deployment.autoscale.downscale_delay_s for c in runners
                                    if c.deployment.autoscale is not None) + 60
            first = settle(cluster, fleet, runners, timeout=settle_within)
            for trace in plan:
                console.print(f"{trace.name} ({trace.description})…")
                run = run_trace(cluster, trace, runners)
                run.settled = settle(cluster, fleet, runners, timeout=settle_within)
                runs.append(run)
        samples = list(sampler.samples)
    finally:
        if cluster is not None:
            cluster.stop(forget=True)
        for proc, _ in workers:
            proc.terminate()
            proc.wait(timeout=10)
        ray.shutdown()
        console.print(f"worker logs: {worker_log.name}")

    results = {run.trace.name: measure(run, runners, samples, fleet) for run in runs}
    _report(results, zero, runs, runners, samples, first, args, time.monotonic() - started)


def targets(results: dict, zero: list[dict], runners: tuple[Contender, ...]) -> list[dict]:
    """The issue's targets, each with its figure and whether it holds, for every autoscaled contender."""
    out = []
    for c in runners:
        if c.deployment.autoscale is None or "step" not in results:
            continue
        step = results["step"]["contenders"][c.name]
        out += [
            {"contender": c.name, "target": "step: >= 95 % of requests within 2 s TTFT after the first cold start",
             "figure": step["ttft_ok_after_cut"], "holds": (step["ttft_ok_after_cut"] or 0) >= 0.95},
            {"contender": c.name, "target": "step: <= 60 % of the fixed-max fleet's replica-minutes",
             "figure": step["replica_minutes_vs_max"], "holds": step["replica_minutes_vs_max"] <= 0.60},
        ]
        for name, r in results.items():
            per = r["contenders"][c.name]["scale_actions_per_change"]
            out.append({"contender": c.name, "target": f"{name}: <= 2 scale actions per load change",
                        "figure": per, "holds": per <= 2})
    answered = [z["ttft_s"] for z in zero]
    worst = None if not answered or None in answered else max(answered)
    out.append({"contender": FROM_ZERO.model,
                "target": f"first request from zero answered (first token) in <= load_s + 1 = {LOAD_S + 1:g} s",
                "figure": worst, "holds": worst is not None and worst <= LOAD_S + 1})
    return out


def print_tables(results: dict, zero: list[dict], checks: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("trace", "contender", "requests", "TTFT ≤2 s after cut", "all", "p50 s", "p95 s", "failed",
                "replica-min", "vs max", "scale actions", "per change", "rise→decided s", "rise→new replica s",
                "min again after end s"):
        table.add_column(col)
    for trace, r in results.items():
        for k, (name, row) in enumerate(r["contenders"].items()):
            table.add_row(f"{trace} (cut {r['cut_s']} s)" if k == 0 else "", name, str(row["requests"]),
                          _pct(row["ttft_ok_after_cut"]), _pct(row["ttft_ok_all"]), _s(row["ttft_p50_s"]),
                          _s(row["ttft_p95_s"]), str(row["failed"]), str(row["replica_minutes"]),
                          _pct(row["replica_minutes_vs_max"]), _s(row.get("scale_actions")),
                          _s(row.get("scale_actions_per_change")),
                          ", ".join(_s(x) for x in row.get("rise_to_decision_s", [])) or "—",
                          ", ".join(_s(x) for x in row.get("rise_to_new_replica_s", [])) or "—",
                          _s(row.get("back_at_min_after_end_s")) + ("" if row.get("back_at_min", True) else " (not)"))
    wide = Console(width=max(console.width, 220))  # unwrapped also when piped (rich then assumes 80 columns)
    wide.print(table)
    for k, z in enumerate(zero, 1):
        wide.print(f"from zero, request {k}: first token after {z['ttft_s']} s — the autoscaler decided after "
                   f"{z['decided_s']} s, the startup reached a worker after {z['startup_at_worker_s']} s and ended "
                   f"there after {z['startup_done_at_worker_s']} s, returned to the keeper after "
                   f"{z['start_returned_s']} s, serving after {z['serving_s']} s; answered in full after "
                   f"{z['answered_in_full_s']} s{'' if z['ok'] else ' — FAILED: ' + str(z['error'])}")
    table = Table(title="the issue's targets")
    for col in ("contender", "target", "figure", "holds"):
        table.add_column(col)
    for c in checks:
        table.add_row(c["contender"], c["target"], _pct(c["figure"]) if "%" in c["target"] else _s(c["figure"]),
                      "yes" if c["holds"] else "no")
    wide.print(table)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def _s(x: object) -> str:
    return "—" if x is None else str(x)


def _report_from_zero(zero: list[dict], took: float) -> None:
    print_tables({}, zero, [], f"from zero alone: {WORKERS} worker managers, a {LOAD_S:g} s cold start")
    console.print(f"took {took:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demand-from-zero.json").write_text(json.dumps({
        "date": datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(), "cpus": os.cpu_count(),
        "took_s": round(took), "load_s": LOAD_S, "from_zero": FROM_ZERO.model_dump(mode="json"), "requests": zero,
        "target_s": LOAD_S + 1, "met": all(z["ttft_s"] is not None and z["ttft_s"] <= LOAD_S + 1 for z in zero),
    }, indent=2) + "\n")


def _report(results: dict, zero: list[dict], runs: list[TraceRun], runners: tuple[Contender, ...],
            samples: list[tuple], first: dict, args: argparse.Namespace, took: float) -> None:
    checks = targets(results, zero, runners)
    print_tables(results, zero, checks,
                 f"{WORKERS} worker managers, {SLOTS} slots each, {LOAD_S:g} s cold start, ~{STREAM_S:.1f} s streams"
                 f"{' — quick smoke run' if args.quick else ''}")
    console.print(f"took {took:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    stem = "demand-quick" if args.quick else "demand"
    (RESULTS / f"{stem}.json").write_text(json.dumps({
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "quick": args.quick, "took_s": round(took),
        "load_generator": (f"RayWorkerManager.generate_stream, closed loop: up to {HIGH} callers per contender, "
                           f"each streaming back to back while the trace wants it (tests/streamed_load.py), one "
                           f"thread and event loop per contender in the benchmark's process; a caller pauses "
                           f"{PAUSE_AFTER_FAILURE} s after a failed stream"),
        "settings": {"workers": WORKERS, "load_s": LOAD_S, "engine_slots": SLOTS, "chunks": CHUNKS,
                     "chunk_delay_s": CHUNK_DELAY, "stream_s": round(STREAM_S, 2), "ttft_ok_s": TTFT_OK,
                     "routing": "power_of_two", "sample_every_s": SAMPLE_EVERY, "registry": "embedded",
                     "contenders": {c.name: c.deployment.model_dump(mode="json") for c in runners},
                     "autoscale": {c.name: c.deployment.autoscale.model_dump() for c in runners
                                   if c.deployment.autoscale is not None},
                     "from_zero": FROM_ZERO.model_dump(mode="json"),
                     "traces": {t.trace.name: {"seconds": t.trace.seconds, "description": t.trace.description,
                                               "changes": t.trace.changes} for t in runs}},
        "settled_before_the_first_trace": first,
        "settled_after_each_trace": {run.trace.name: run.settled for run in runs},
        "results": results,
        "from_zero": zero,
        "targets": checks,
        "samples": {run.trace.name: {
            "began": run.began,
            "per_contender": {c.name: [[round(t - run.began, 2), *shape]
                                       for t, shape in shapes_of(samples, i, run.began - 2, run.aftermath + 2)]
                              for i, c in enumerate(runners)},
            "fields": ["t_s", *Shape._fields]} for run in runs},
    }, indent=2) + "\n")
    _plot(results, runs, runners, samples, RESULTS / f"{stem}.png")


def _plot(results: dict, runs: list[TraceRun], runners: tuple[Contender, ...], samples: list[tuple],
          path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(len(runs), len(runners), figsize=(5 * len(runners), 3.2 * len(runs)),
                             squeeze=False, sharey=True)
    for row, run in zip(axes, runs):
        cut = results[run.trace.name]["cut_s"]
        steps = [k * SAMPLE_EVERY for k in range(int(run.trace.seconds / SAMPLE_EVERY) + 1)]
        for i, (ax, c) in enumerate(zip(row, runners)):
            load = ax.twinx()
            load.fill_between(steps, [run.trace.level(t) for t in steps], step="post", color="#bbbbbb", alpha=0.4,
                              label="streams wanted")
            load.set_ylim(0, HIGH * 1.15)
            if i == len(runners) - 1:
                load.set_ylabel("concurrent streams")
            else:
                load.set_yticklabels([])
            points = shapes_of(samples, i, run.began - 2, run.aftermath + 2)
            t = [p - run.began for p, _ in points]
            load.plot(t, [s.load for _, s in points], color="#555555", linewidth=0.8,
                      label="in flight and held (coordinator)")
            ax.set_zorder(load.get_zorder() + 1)
            ax.patch.set_visible(False)
            ax.plot(t, [s.held for _, s in points], drawstyle="steps-post", color="#c44e52", label="replicas held")
            ax.plot(t, [s.serving for _, s in points], drawstyle="steps-post", color="#4c72b0", linestyle="--",
                    label="serving")
            ax.axvline(cut, color="black", linestyle=":", linewidth=1)
            ax.set_ylim(0, MAX_REPLICAS + 1)
            ax.set_title(f"{run.trace.name} — {c.name}", fontsize=9)
            ax.set_xlabel("seconds into the trace")
            if run is runs[0] and i == 0:  # one legend, for the replicas and the load alike
                ax.legend(handles=ax.get_legend_handles_labels()[0] + load.get_legend_handles_labels()[0],
                          fontsize=7, loc="upper left")
        row[0].set_ylabel("replicas")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
