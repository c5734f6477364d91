"""The benchmark suite: the original algorithm, the physical floor, and the
coordinator, measured side by side in one run against the same workers.

Contenders
  baseline     DB-GPT's RemoteWorkerManager algorithm (bench/baseline.py): a
               registry lookup per call, a new httpx client per request,
               asyncio.gather over instances.
  floor        a direct in-process fan-out with one kept-open client per
               worker, no registry, no Ray: what a hand-written script can do.
  coordinator  Cluster.apply through the coordinator and proxy actors.

Workloads (reference workers with a fixed added latency, 20 ms by default,
registered in the embedded registry): fan-out latency of one apply to N = 8, 32,
64 instances; throughput with 20 and 100 applies in flight, each to one of 20
models served by the same 32 workers; supported_models over every worker
manager; growth N=64 / N=8.

    python -m bench.suite [--runs 20] [--latency 0.02]     # or: make bench

Prints a table, writes bench/results/latest.json and bench/results/latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import httpx
import ray
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import coordinator
from coordinator.plumbing.transport import client_limits
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings
from bench.baseline import BaselineManager

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (8, 32, 64)
HOSTS = 4  # processes the reference workers are spread over
#: Throughput callers spread their applies over this many models, each served
#: by the same 32 workers. (The coordinator runs operations on one model one at
#: a time, in order, by design; applies all to one model would measure that
#: guarantee — throughput = 1 / latency — rather than dispatch capacity.)
THROUGHPUT_MODELS = 20
THROUGHPUT_N = 32
console = Console()


class Floor:
    """One kept-open client per worker; gather; nothing else."""

    def __init__(self, endpoints: dict[str, list[tuple[str, int]]]) -> None:
        self._endpoints = endpoints
        every = {ep for eps in endpoints.values() for ep in eps}
        self._clients = {
            ep: httpx.AsyncClient(base_url=f"http://{ep[0]}:{ep[1]}/api/worker", timeout=60,
                                  limits=client_limits()) for ep in every
        }

    async def apply(self, model: str) -> list[dict]:
        body = {"model": model, "apply_type": "start", "worker_type": "llm", "params": {}, "apply_user": None}

        async def one(ep):
            r = await self._clients[ep].post("/apply", json=body)
            r.raise_for_status()  # a refused call must not pass for a fast one
            return r.json()

        return await asyncio.gather(*(one(ep) for ep in self._endpoints[model]))

    async def supported_models(self) -> list[dict]:
        async def one(client):
            return (await client.get("/models/supports")).json()

        return [m for ms in await asyncio.gather(*(one(c) for c in self._clients.values())) for m in ms]

    async def close(self) -> None:
        for c in self._clients.values():
            await c.aclose()


def _check_success(contender: str, answer: object) -> None:
    """Every contender's apply must really succeed before it is timed."""
    outputs = (answer.outputs if hasattr(answer, "outputs") else answer if isinstance(answer, list) else [answer])
    failed = [o for o in outputs if not (o.success if hasattr(o, "success") else o.get("success"))]
    if failed:
        raise RuntimeError(f"{contender}: apply failed during warm-up: {failed[0]}")


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


async def throughput(fn: Callable[[str], Awaitable[object]], in_flight: int, window: float) -> float:
    """Applies per second with ``in_flight`` callers issuing for ``window``
    seconds, caller i to model ``t{i % THROUGHPUT_MODELS}``; calls still running
    at the end are waited for and counted."""
    done = 0
    stop_at = time.perf_counter() + window

    async def caller(model: str):
        nonlocal done
        while time.perf_counter() < stop_at:
            await fn(model)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(f"t{i % THROUGHPUT_MODELS}") for i in range(in_flight)))
    return done / (time.perf_counter() - started)


def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median": statistics.median(xs), "p95": xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))],
            "n": len(xs)}


async def measure(
    cluster, baseline: BaselineManager, floor: Floor, runs: int, window: float, progress: Progress
) -> dict:
    contenders = {
        "baseline": lambda m: baseline.worker_apply(m),
        "floor": lambda m: floor.apply(m),
        "coordinator": lambda m: cluster.aio.apply(m, "start"),
    }
    for m in (f"n{n}" for n in SIZES):  # warm every path once, and check that it works
        for name, fn in contenders.items():
            _check_success(name, await fn(m))

    phases: dict[str, float] = {}
    mark = time.perf_counter()
    latency: dict[str, dict[int, list[float]]] = {c: {n: [] for n in SIZES} for c in contenders}
    task = progress.add_task("fan-out latency", total=runs * len(SIZES) * len(contenders))
    for _ in range(runs):
        for n in SIZES:
            for name, fn in contenders.items():  # interleaved: side by side
                latency[name][n].append(await timed(lambda: fn(f"n{n}")))
                progress.advance(task)

    phases["latency"], mark = time.perf_counter() - mark, time.perf_counter()
    rates: dict[str, dict[int, float]] = {c: {} for c in contenders}
    task = progress.add_task(f"throughput at N={THROUGHPUT_N}", total=2 * len(contenders))
    for k in (20, 100):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            rates[name][k] = await throughput(fn, k, window)
            phases[f"throughput {name} {k}"] = time.perf_counter() - t0
            progress.advance(task)
    mark = time.perf_counter()

    supports: dict[str, list[float]] = {c: [] for c in contenders}
    sup = {
        "baseline": baseline.supported_models,
        "floor": floor.supported_models,
        "coordinator": cluster.aio.supported_models,
    }
    task = progress.add_task("supported_models", total=max(5, runs // 2) * len(sup))
    for _ in range(max(5, runs // 2)):
        for name, fn in sup.items():
            supports[name].append(await timed(fn))
            progress.advance(task)
    phases["supported_models"] = time.perf_counter() - mark
    return {"latency": latency, "throughput": rates, "supports": supports, "phase_seconds": phases}


def report(raw: dict, args: argparse.Namespace) -> dict:
    lat = {c: {n: stats(xs) for n, xs in per.items()} for c, per in raw["latency"].items()}
    med = {c: {n: s["median"] for n, s in per.items()} for c, per in lat.items()}
    figures = {
        "phase_seconds": {k: round(v, 1) for k, v in raw["phase_seconds"].items()},
        "latency_s": lat,
        "throughput_per_s": raw["throughput"],
        "supported_models_s": {c: stats(xs) for c, xs in raw["supports"].items()},
        "growth_n64_over_n8": {c: med[c][64] / med[c][8] for c in med},
        "ratios": {
            "baseline_over_coordinator_latency_n32": med["baseline"][32] / med["coordinator"][32],
            "coordinator_over_baseline_throughput_20": raw["throughput"]["coordinator"][20]
            / raw["throughput"]["baseline"][20],
            "coordinator_over_floor_latency_n32": med["coordinator"][32] / med["floor"][32],
            "coordinator_growth_n64_over_n8": med["coordinator"][64] / med["coordinator"][8],
        },
    }
    targets = {
        "coordinator >= 10x lower latency than baseline at N=32": figures["ratios"]["baseline_over_coordinator_latency_n32"] >= 10,
        "coordinator >= 20x baseline throughput, 20 in flight": figures["ratios"]["coordinator_over_baseline_throughput_20"] >= 20,
        "coordinator within 2x of floor at N=32": figures["ratios"]["coordinator_over_floor_latency_n32"] <= 2,
        "coordinator N=64 <= 2x its N=8": figures["ratios"]["coordinator_growth_n64_over_n8"] <= 2,
    }

    table = Table(title=f"apply fan-out latency, ms (median / p95), worker latency {args.latency * 1000:g} ms")
    table.add_column("contender")
    for n in SIZES:
        table.add_column(f"N={n}")
    table.add_column("N=64 / N=8")
    for c, per in lat.items():
        table.add_row(c, *(f"{per[n]['median'] * 1e3:.1f} / {per[n]['p95'] * 1e3:.1f}" for n in SIZES),
                      f"{figures['growth_n64_over_n8'][c]:.2f}x")
    console.print(table)
    table = Table(title=f"throughput at N={THROUGHPUT_N} over {THROUGHPUT_MODELS} models (applies/s) "
                        "and supported_models over 64 managers (ms)")
    for col in ("contender", "20 in flight", "100 in flight", "supported_models median"):
        table.add_column(col)
    for c in lat:
        table.add_row(c, f"{raw['throughput'][c][20]:.1f}", f"{raw['throughput'][c][100]:.1f}",
                      f"{figures['supported_models_s'][c]['median'] * 1e3:.1f}")
    console.print(table)
    table = Table(title="targets")
    table.add_column("target")
    table.add_column("figure")
    table.add_column("holds")
    for (name, ok), value in zip(targets.items(), figures["ratios"].values()):
        table.add_row(name, f"{value:.2f}x", "[green]yes[/]" if ok else "[red]no[/]")
    console.print(table)
    return {**figures, "targets": targets}


def plot(lat: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for c, per in lat.items():
        ax.plot(SIZES, [per[n]["median"] * 1e3 for n in SIZES], marker="o", label=c)
    ax.set_xlabel("instances per apply (N)")
    ax.set_ylabel("median apply latency (ms)")
    ax.set_yscale("log")
    ax.set_xticks(SIZES)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds each worker adds")
    parser.add_argument("--window", type=float, default=8.0, help="seconds per throughput measurement")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(namespace="bench", include_dashboard=False, logging_level="WARNING")
    started = time.time()
    cluster = coordinator.start(
        # Workers heartbeat every 30 s (expiry checked every 10 s): 64 workers
        # with up to 23 models each must not keep the registry busy meanwhile.
        {"registries": [{"kind": "embedded", "port": 0, "heartbeat_interval": 10, "heartbeat_timeout": 120}]},
        name="bench", namespace="bench",
    )
    hosts = [ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote() for _ in range(HOSTS)]
    registry = cluster.registry_url()
    try:
        with console.status(f"starting {max(SIZES)} reference workers and their proxies…"):
            settings = []
            for i in range(max(SIZES)):
                models = [SimModel(name=f"n{n}") for n in SIZES if i < n]
                if i < THROUGHPUT_N:
                    models += [SimModel(name=f"t{j}") for j in range(THROUGHPUT_MODELS)]
                settings.append(WorkerSettings(controller=registry, heartbeat_interval=30, models=models))
            ports = ray.get([hosts[i % HOSTS].add.remote(s) for i, s in enumerate(settings)])
            for i, port in enumerate(ports):
                ray.get(hosts[i % HOSTS].set_faults.remote(port, latency=args.latency))
            for n in SIZES:
                cluster.wait_for(f"n{n}", count=n, timeout=300)
            for j in range(THROUGHPUT_MODELS):
                cluster.wait_for(f"t{j}", count=THROUGHPUT_N, timeout=300)
            endpoints = {f"n{n}": [("127.0.0.1", p) for p in ports[:n]] for n in SIZES}
            endpoints |= {f"t{j}": [("127.0.0.1", p) for p in ports[:THROUGHPUT_N]] for j in range(THROUGHPUT_MODELS)}
        startup = time.time() - started

        async def run() -> dict:
            floor = Floor(endpoints)
            baseline = BaselineManager(registry)
            try:
                with Progress(console=console) as progress:
                    return await measure(cluster, baseline, floor, args.runs, args.window, progress)
            finally:
                await floor.close()

        raw = asyncio.run(run())
        raw["phase_seconds"] = {"startup": startup, **raw["phase_seconds"]}
    finally:
        ray.get([h.stop_all.remote() for h in hosts])
        cluster.stop()
        ray.shutdown()

    figures = report(raw, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(figures["latency_s"], RESULTS / "latency.png")
    (RESULTS / "latest.json").write_text(json.dumps({
        "date": datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "ray": ray.__version__},
        "settings": {"runs": args.runs, "worker_latency_s": args.latency, "sizes": SIZES,
                     "window_s": args.window, "throughput_models": THROUGHPUT_MODELS, "throughput_n": THROUGHPUT_N},
        **figures,
    }, indent=2, default=str))
    console.print(f"wrote {RESULTS / 'latest.json'} and latency.png in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
