"""Rollouts under streamed load, without and with draining (issue #20, point 6).

Four reference worker managers (processes) whose models take 2 s to load
and abort the requests in flight on them when they stop, as an engine does
(``--load-s 2``); answers of 30 chunks 0.08 s apart, so every stream lasts
~2.5 s. They register with the embedded registry of a coordinator (defaults,
but for its drain). A deployment keeps 4 replicas of one model on them, and
``--callers`` callers stream it back to back through ``RayWorkerManager``.
Under that load, one after the other, ``--settle`` seconds of steady load
before each:

1. a rolling restart of the 4 instances (``apply restart``, max_unavailable=1);
2. a rolling ``update_params`` over the 4 with a changed parameter (the
   workers reload the model), max_unavailable=1;
3. the deployment scaled down 4 -> 1 (the keeper stops 3);
4. an undeploy with shutdown (the keeper stops the last one).

Contenders, on the same worker processes: **without draining** (every apply
with ``drain_timeout=0``, and a coordinator configured ``drain: {timeout: 0}``
for the keeper's stops) and **with draining** (the defaults: ``drain.timeout``
60 s, ``drain.grace`` 10 s). The keeper's drain comes only from the
coordinator's config, and the workers register with one registry, so the
coordinator (and its embedded registry, on the same port: the workers
register again by heartbeat) is restarted between contenders rather than run
twice side by side, where two keepers and two sets of probes would act on one
fleet. The contenders alternate cycle by cycle (``--cycles``), so both see the
same drift in the machine's load.

Per operation and contender:

- **lost per 10,000**: failed or truncated streams among those that
  overlapped the operation — from its call until, its work done (an apply's
  return, the keeper's last stop), the fleet had its final shape; for the
  undeploy, among the streams in flight when it began (the new ones fail
  with "no instance", as they should);
- **failed** (ended before any content) and **truncated** (cut midway);
- **aborted / refused**: from the workers' journals, the requests a stopping
  model aborted and those refused because the model was not loaded — the
  requests that reached a stopping or loading instance;
- **duration**: of the call (apply, deploy(wait=True), undeploy), and until
  the fleet had changed (the end of the window above);
- **capacity**: the model's instances serving (``cluster.status()``:
  healthy and not draining), sampled every 0.2 s — least and mean during the
  operation, and plotted.

The load generator is ``RayWorkerManager.generate_stream`` in one thread of
this process (its own event loop), sharing the machine's cores with the
workers and the coordinator; the callers' first streams start spread over a
stream's length (started together, equal streams would stay in step and end
all at once, every time), and a caller whose stream failed waits 0.2 s
before the next (tests/streamed_load.py).

    python -m bench.rollout [--callers 8] [--cycles 3] [--settle 6] [--quick]   # or: make rollout

Writes bench/results/rollout.json and bench/results/rollout.png
(``--quick``, a smoke run: rollout-quick.json and rollout-quick.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")
# Importing tests/conftest.py turns Ray's token authentication on (for the
# tests); this run keeps the mode it was started with.
_auth_mode = os.environ["RAY_AUTH_MODE"]

import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import coordinator  # noqa: E402
from bench.detection import spawn  # noqa: E402
from coordinator.core.deployments import Deployment  # noqa: E402
from tests.conftest import free_port, wait_until  # noqa: E402
from tests.streamed_load import Stream, StreamedLoad, journal  # noqa: E402

os.environ["RAY_AUTH_MODE"] = _auth_mode

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
console = Console()

NAMESPACE = "bench-rollout"
MODEL = "roll"
WORKERS = 4
LOAD_S = 2.0
CHUNKS, CHUNK_DELAY = 30, 0.08
#: A stream's length (the answer is 30 words: a chunk each); the callers'
#: starts are spread over it, so that streams end at any moment, not in step.
STREAM_S = CHUNKS * CHUNK_DELAY
FLEET = Deployment(model=MODEL, replicas=WORKERS, params={"provider": "proxy/sim"}, max_unavailable=1)
#: A changed parameter: the workers reload the model (DB-GPT restarts only then).
NEW_PARAMS = {"temperature": 0.3}
SAMPLE_EVERY = 0.2
PAUSE_AFTER_FAILURE = 0.2
GENERATE = "/api/worker/generate_stream"


@dataclass(frozen=True)
class Contender:
    name: str
    slug: str
    #: The coordinator config's drain section: what the keeper's stops drain by.
    drain: dict
    #: Each apply's drain_timeout (None: the config's drain.timeout).
    drain_timeout: float | None


CONTENDERS = (
    Contender("without draining", "no-drain", {"timeout": 0}, 0),
    Contender("with draining", "drain", {}, None),  # the defaults: timeout 60 s, grace 10 s
)


@dataclass(frozen=True)
class Outcome:
    #: The messages of its outputs (of the keeper's stop events).
    messages: list[str]
    #: When (wall clock) its work on the fleet ended: an apply's return, the
    #: keeper's last stop. A deploy(wait=True) may return later than that.
    finished: float


@dataclass(frozen=True)
class Operation:
    name: str
    #: The model's instances serving once it is over.
    serving_after: int
    #: Counted: the streams that overlapped it; or (False) only those in
    #: flight when it began — after an undeploy began, new requests rightly fail.
    counts_new_requests: bool
    act: Callable[[coordinator.Cluster, Contender], Outcome]


def rolling(apply_type: str, params: dict | None = None) -> Callable[[coordinator.Cluster, Contender], Outcome]:
    def act(cluster: coordinator.Cluster, contender: Contender) -> Outcome:
        result = cluster.apply(MODEL, apply_type, params=params, max_unavailable=1,
                               drain_timeout=contender.drain_timeout)
        if not result.output.success:
            raise RuntimeError(f"{apply_type} failed: {result.output.message}")
        return Outcome([o.message for o in result.outputs], time.time())

    return act


def stops(status: coordinator.DeploymentStatus, since: float) -> Outcome:
    """The keeper's stops since ``since``, from the deployment's events."""
    events = [e for e in status.events if e.action == "stop" and e.at >= since]
    return Outcome([e.message for e in events], max((e.at for e in events), default=time.time()))


def scale_down(cluster: coordinator.Cluster, contender: Contender) -> Outcome:
    began = time.time()
    cluster.deploy(FLEET.model_copy(update={"replicas": 1}), wait=True, timeout=120)
    [status] = [d for d in cluster.deployments() if d.key == FLEET.key]
    return stops(status, began)


def undeploy(cluster: coordinator.Cluster, contender: Contender) -> Outcome:
    began = time.time()
    return stops(cluster.undeploy(MODEL, shutdown=True), began)


OPERATIONS = (
    Operation("rolling restart", WORKERS, True, rolling("restart")),
    Operation("rolling update_params", WORKERS, True, rolling("update_params", NEW_PARAMS)),
    Operation(f"scale down {WORKERS} -> 1", 1, True, scale_down),
    Operation("undeploy (shutdown)", 0, False, undeploy),
)


class CapacitySampler:
    """Every ``every`` seconds (wall-clock time, ``*sample(cluster)``): by
    default (time, the model's instances serving — healthy and not draining
    —, draining), every SAMPLE_EVERY seconds (bench/demand.py samples its own)."""

    def __init__(self, cluster: coordinator.Cluster, sample: Callable[[coordinator.Cluster], tuple] | None = None,
                 every: float = SAMPLE_EVERY) -> None:
        self._cluster, self._every = cluster, every
        self._sample = sample or shape
        self.samples: list[tuple] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._every):
                self.samples.append((time.time(), *self._sample(self._cluster)))
        except BaseException as exc:  # noqa: BLE001 - raised again in the benchmark's thread on exit
            self._error = exc

    def __enter__(self) -> CapacitySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._error is not None:
            raise RuntimeError("sampling the capacity failed") from self._error


def shape(cluster: coordinator.Cluster) -> tuple[int, int]:
    """(the model's instances serving, draining) now."""
    rows = [r for r in cluster.status().instances if r.model == MODEL]
    return sum(1 for r in rows if r.healthy and not r.draining), sum(1 for r in rows if r.draining)


@dataclass
class Window:
    """One operation as it ran, in wall-clock seconds."""

    operation: Operation
    began: float
    returned: float  # its call returned
    outcome: Outcome
    #: When, its work over, the fleet had its final shape (instances serving,
    #: none draining): first as the benchmark polled it after the call, then
    #: the first capacity sample from the work's end that shows it.
    settled: float


@dataclass
class ContenderRun:
    """One contender's pass over the operations, with everything it saw."""

    contender: Contender
    cycle: int
    windows: list[Window] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)  # the workers' journals' generate calls
    samples: list[tuple[float, int, int]] = field(default_factory=list)


def run_contender(contender: Contender, cycle: int, registry_port: int, worker_ports: list[int],
                  callers: int, settle: float) -> ContenderRun:
    run = ContenderRun(contender, cycle)
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "name": "fleet", "port": registry_port, "heartbeat_interval": 1}],
         "drain": contender.drain},
        name=f"rollout-{contender.slug}", namespace=NAMESPACE)
    try:
        cluster.wait_for("WorkerManager", count=WORKERS, worker_type="service", timeout=60)
        cluster.deploy(FLEET, wait=True, timeout=120)
        wait_until(lambda: shape(cluster) == (WORKERS, 0), timeout=60, interval=0.1, what="every replica serving")
        with CapacitySampler(cluster) as sampler, \
                StreamedLoad(cluster, MODEL, callers, pause_after_failure=PAUSE_AFTER_FAILURE,
                             spread=STREAM_S) as load:
            for op in OPERATIONS:
                time.sleep(settle)
                console.print(f"  cycle {cycle + 1}, {contender.name}: {op.name}…")
                began = time.time()
                outcome = op.act(cluster, contender)
                returned = time.time()
                wait_until(lambda: shape(cluster) == (op.serving_after, 0), timeout=60, interval=0.1,
                           what=f"{op.serving_after} instance(s) serving after the {op.name}")
                shaped = time.time()
                run.windows.append(Window(op, began, returned, outcome, settled=shaped))
        run.streams, run.samples = list(load.streams), list(sampler.samples)
        for w in run.windows:
            final = (w.operation.serving_after, 0)
            w.settled = next((t for t, n, d in run.samples if t >= w.outcome.finished and (n, d) == final),
                             w.settled)
        run.entries = [e for port in worker_ports for e in journal(port) if e["path"] == GENERATE]
    finally:
        cluster.stop(forget=True)
    return run


def measure(window: Window, run: ContenderRun) -> dict:
    """One operation's figures, from the streams, journals and samples of its run."""
    begin, end = window.began, window.settled
    if window.operation.counts_new_requests:
        counted = [s for s in run.streams if s.overlaps(begin, end)]
        entries = [e for e in run.entries if e["t"] < end and e.get("t_end", end) > begin]
    else:  # in flight when it began
        counted = [s for s in run.streams if s.began < begin < s.ended]
        entries = [e for e in run.entries if e["t"] < begin < e.get("t_end", end)]
    serving = [n for t, n, _ in run.samples if begin <= t <= end]
    text = " ".join(window.outcome.messages)
    return {
        "duration_s": round(window.returned - window.began, 2),
        "changed_in_s": round(window.settled - window.began, 2),
        "streams": len(counted),
        "failed": sum(s.failed for s in counted),
        "truncated": sum(s.truncated for s in counted),
        "errors": dict(Counter(error_kind(s.error) for s in counted if not s.ok)),
        "aborted": sum(1 for e in entries if e.get("aborted")),
        # Refused requests are new ones: not counted where only those in flight are.
        "refused": sum(1 for e in entries if e.get("refused")) if window.operation.counts_new_requests else None,
        "min_serving": min(serving, default=None),
        "mean_serving": round(statistics.fmean(serving), 2) if serving else None,
        "drains_s": [float(x) for x in re.findall(r"drained in ([\d.]+) s", text)],
        "drains_timed_out": text.count("drain timed out"),
        "messages": window.outcome.messages,
    }


def error_kind(error: str | None) -> str:
    if error is None:
        return "unfinished, no error"
    if "for model name" in error:  # the worker's words: the model is not running there
        return "refused: model not loaded"
    if "none is healthy, enabled and reachable" in error:  # the router's: nothing to send to
        return "no instance"
    return "stream broken"


def outside(run: ContenderRun) -> dict:
    """Streams outside every operation (until the undeploy began): lost ones
    would be a loss no operation explains. And the undeploy's new requests."""
    last = run.windows[-1]
    quiet = [s for s in run.streams if s.began < last.began
             and not any(s.overlaps(w.began, w.settled) for w in run.windows)]
    new = [s for s in run.streams if s.began >= last.began]
    return {"streams_outside_operations": len(quiet), "lost_outside_operations": sum(not s.ok for s in quiet),
            "new_during_undeploy": len(new),
            "new_during_undeploy_errors": dict(Counter(error_kind(s.error) for s in new if not s.ok))}


def summarise(runs: list[ContenderRun]) -> dict:
    """Per operation and contender: the figures of every cycle added up."""
    out: dict[str, dict[str, dict]] = {}
    for i, op in enumerate(OPERATIONS):
        out[op.name] = {}
        for contender in CONTENDERS:
            cycles = [measure(r.windows[i], r) for r in runs if r.contender == contender]
            streams = sum(c["streams"] for c in cycles)
            lost = sum(c["failed"] + c["truncated"] for c in cycles)
            refused = [c["refused"] for c in cycles if c["refused"] is not None]
            drains = [d for c in cycles for d in c["drains_s"]]
            means = [c["mean_serving"] for c in cycles if c["mean_serving"] is not None]
            out[op.name][contender.name] = {
                "cycles": len(cycles), "streams": streams, "failed": sum(c["failed"] for c in cycles),
                "truncated": sum(c["truncated"] for c in cycles),
                "lost_per_10k": round(lost / streams * 10_000) if streams else None,
                "aborted": sum(c["aborted"] for c in cycles), "refused": sum(refused) if refused else None,
                "duration_s_median": round(statistics.median(c["duration_s"] for c in cycles), 2),
                "changed_in_s_median": round(statistics.median(c["changed_in_s"] for c in cycles), 2),
                "min_serving": min((c["min_serving"] for c in cycles if c["min_serving"] is not None), default=None),
                "mean_serving": round(statistics.fmean(means), 2) if means else None,
                "drain_s_mean": round(statistics.fmean(drains), 2) if drains else None,
                "drains_timed_out": sum(c["drains_timed_out"] for c in cycles),
                "per_cycle": cycles,
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=8, help="concurrent streaming callers")
    parser.add_argument("--cycles", type=int, default=3, help="passes of both contenders, alternating who goes first")
    parser.add_argument("--settle", type=float, default=6.0,
                        help="seconds of steady load before each operation")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 cycle, 3 s of settling; writes rollout-quick.*")
    args = parser.parse_args()
    if args.quick:
        args.cycles, args.settle = 1, 3.0
    # address="local": a Ray of our own, never one someone else started on this machine.
    ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, logging_level="WARNING")
    registry_port = free_port()
    registry = f"http://127.0.0.1:{registry_port}"
    worker_log = tempfile.NamedTemporaryFile("w", prefix="bench-rollout-workers-", suffix=".log", delete=False)
    # The workers register with whichever coordinator's embedded registry serves
    # that port; between coordinators their heartbeats fail (logged there).
    workers = [spawn(["reference_worker", "--controller", registry, "--heartbeat-interval", "1",
                      "--load-s", str(LOAD_S), "--chunks", str(CHUNKS), "--chunk-delay", str(CHUNK_DELAY)],
                     stderr=worker_log) for _ in range(WORKERS)]
    worker_ports = [port for _, port in workers]
    runs: list[ContenderRun] = []
    started = time.monotonic()
    try:
        for cycle in range(args.cycles):
            order = CONTENDERS if cycle % 2 == 0 else tuple(reversed(CONTENDERS))
            for contender in order:
                runs.append(run_contender(contender, cycle, registry_port, worker_ports, args.callers, args.settle))
    finally:
        for proc, _ in workers:
            proc.terminate()
            proc.wait(timeout=10)
        ray.shutdown()
        console.print(f"worker logs: {worker_log.name}")

    results = summarise(runs)
    _report(results, runs, args, time.monotonic() - started)


def print_table(results: dict, title: str) -> None:
    """The figures per operation and contender (``results`` as in rollout.json)."""
    table = Table(title=title)
    for col in ("operation", "contender", "call s", "changed s", "streams", "failed", "truncated", "lost/10k",
                "aborted", "refused", "serving min", "mean", "drain s"):
        table.add_column(col)
    for op, rows in results.items():
        for name, r in rows.items():
            table.add_row(op if name == CONTENDERS[0].name else "", name, *(
                "—" if r[k] is None else str(r[k]) for k in (
                    "duration_s_median", "changed_in_s_median", "streams", "failed", "truncated", "lost_per_10k",
                    "aborted", "refused", "min_serving", "mean_serving", "drain_s_mean")))
    # Its 13 columns, unwrapped also when the output is piped (rich then assumes 80 columns).
    Console(width=max(console.width, 150)).print(table)


def _report(results: dict, runs: list[ContenderRun], args: argparse.Namespace, took: float) -> None:
    print_table(results, f"{WORKERS} instances under {args.callers} streaming callers (~2.5 s streams), "
                         f"{args.cycles} cycle(s){' — quick smoke run' if args.quick else ''}")
    checks = [(r.contender.name, r.cycle + 1, outside(r)) for r in runs]
    for name, cycle, o in checks:
        console.print(f"cycle {cycle}, {name}: {o['lost_outside_operations']} of {o['streams_outside_operations']} "
                      f"streams outside the operations lost; {o['new_during_undeploy']} sent after the undeploy "
                      f"began: {o['new_during_undeploy_errors'] or 'none failed'}")
    console.print(f"took {took:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    stem = "rollout-quick" if args.quick else "rollout"
    (RESULTS / f"{stem}.json").write_text(json.dumps({
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "quick": args.quick, "took_s": round(took),
        "load_generator": (f"RayWorkerManager.generate_stream, {args.callers} callers back to back in one thread "
                           f"of the benchmark's process (its own event loop), their first streams spread over "
                           f"{STREAM_S:g} s; a caller pauses {PAUSE_AFTER_FAILURE} s after a failed stream"),
        "settings": {"workers": WORKERS, "load_s": LOAD_S, "chunks": CHUNKS, "chunk_delay_s": CHUNK_DELAY,
                     "callers": args.callers, "cycles": args.cycles, "settle_s": args.settle,
                     "registry": "embedded", "sample_every_s": SAMPLE_EVERY,
                     "contenders": {c.name: {"config drain": c.drain, "apply drain_timeout": c.drain_timeout}
                                    for c in CONTENDERS}},
        "results": results,
        "outside_operations": [{"contender": name, "cycle": cycle, **o} for name, cycle, o in checks],
        "capacity_samples": [{"contender": r.contender.name, "cycle": r.cycle + 1,
                              "operations": [{"operation": w.operation.name, "began": w.began,
                                              "returned": w.returned, "finished": w.outcome.finished,
                                              "settled": w.settled} for w in r.windows],
                              "samples": [[round(t, 2), n, d] for t, n, d in r.samples]} for r in runs],
    }, indent=2) + "\n")
    _plot(runs, RESULTS / f"{stem}.png")


def _plot(runs: list[ContenderRun], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    colours = dict(zip((c.name for c in CONTENDERS), ("#c44e52", "#4c72b0")))
    fig, axes = plt.subplots(1, len(OPERATIONS), figsize=(4.5 * len(OPERATIONS), 3.6), sharey=True)
    for i, (ax, op) in enumerate(zip(axes, OPERATIONS)):
        labelled: set[str] = set()
        for run in runs:
            w = run.windows[i]
            name = run.contender.name
            points = [(t - w.began, n) for t, n, _ in run.samples if w.began - 2 <= t <= w.settled + 2]
            if not points:
                continue
            ax.plot(*zip(*points), drawstyle="steps-post", color=colours[name], alpha=0.8,
                    label=None if name in labelled else name)
            ax.axvline(w.settled - w.began, color=colours[name], linestyle=":", linewidth=1)
            labelled.add(name)
        ax.set_title(op.name, fontsize=10)
        ax.set_xlabel("seconds since the operation began")
    axes[0].set_ylabel("instances serving")
    axes[0].set_yticks(range(WORKERS + 1))
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
