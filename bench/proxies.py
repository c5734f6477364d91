"""What a proxy actor costs: memory (RSS) and start-up time, one proxy and a
whole set, beside an empty Ray actor measured in the same run.

The coordinator follows a static source listing N endpoints (something listens
on each, so every probe answers); the clock runs from ``coordinator.start`` until
every proxy has started and reported its first probe.

    python -m bench.proxies [--endpoints 128]     # or: make proxies

Prints a table and writes bench/results/proxies.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from datetime import datetime
from pathlib import Path

import psutil

# Token auth on, as the tests and a deployment have it; Ray reads this when imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
import ray  # noqa: E402
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import coordinator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FIRST_PORT = 23000
console = Console()


class Empty:
    """The floor: a Ray actor that imports nothing of ours."""

    def pid(self) -> int:
        return os.getpid()


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def uss_mib(pid: int) -> float:
    """Memory the process alone holds (not shared with others)."""
    return psutil.Process(pid).memory_full_info().uss / 2**20


async def serve_endpoints(n: int) -> list[asyncio.Server]:
    async def accept(reader, writer):
        writer.close()

    return [await asyncio.start_server(accept, "127.0.0.1", FIRST_PORT + i) for i in range(n)]


def measure(n: int) -> dict:
    empties = [ray.remote(Empty).options(num_cpus=0).remote() for _ in range(4)]
    started = time.monotonic()
    empty_pids = ray.get([e.pid.remote() for e in empties])
    empty_start = (time.monotonic() - started) / len(empties)
    empty_rss = statistics.median(rss_mib(p) for p in empty_pids)
    empty_uss = statistics.median(uss_mib(p) for p in empty_pids)
    for e in empties:
        ray.kill(e)

    instances = [{"model_name": "m@llm", "host": "127.0.0.1", "port": FIRST_PORT + i, "healthy": True}
                 for i in range(n)]
    started = time.monotonic()
    cluster = coordinator.start({"registries": [{"kind": "static", "instances": instances}]},
                                name="proxies", namespace="bench")
    try:
        with Progress(console=console) as progress:
            task = progress.add_task(f"{n} proxies starting", total=n)
            while True:
                reachable = sum(1 for i in cluster.status().instances if i.reachable)
                progress.update(task, completed=reachable)
                if reachable == n:
                    break
                if time.monotonic() - started > 60 + 5 * n:
                    raise RuntimeError(f"only {reachable} of {n} proxies reported")
                time.sleep(0.5)
        all_ready = time.monotonic() - started
        coord = ray.get_actor("proxies", namespace="bench")
        handles = ray.get([coord.proxy_handle.remote("127.0.0.1", FIRST_PORT + i) for i in range(n)])
        pids = [info["pid"] for info in ray.get([h.process_info.remote() for h in handles])]
        rss = [rss_mib(p) for p in pids]
        uss = [uss_mib(p) for p in pids]
        # One more proxy, alone, on a warm cluster: its own start-up time.
        extra = {"model_name": "m@llm", "host": "127.0.0.1", "port": FIRST_PORT + n, "healthy": True}
    finally:
        cluster.stop()
    one = single_proxy_start(extra)
    return {
        "endpoints": n,
        "all_reported_s": round(all_ready, 1),
        "per_proxy_s": round(all_ready / n, 3),
        "one_proxy_start_s": round(one, 2),
        "proxy_rss_mib_median": round(statistics.median(rss), 1),
        "proxy_uss_mib_median": round(statistics.median(uss), 1),
        "empty_actor_rss_mib": round(empty_rss, 1),
        "empty_actor_uss_mib": round(empty_uss, 1),
        "empty_actor_start_s": round(empty_start, 2),
        "proxies_per_gib_by_uss": int(1024 // statistics.median(uss)),
        "total_rss_gib": round(sum(rss) / 1024, 2),
    }


def single_proxy_start(instance: dict) -> float:
    cluster = coordinator.start({"registries": [{"kind": "static", "instances": [instance]}]},
                                name="one-proxy", namespace="bench")
    try:
        started = time.monotonic()
        while not any(i.reachable for i in cluster.status().instances):
            time.sleep(0.05)
        return time.monotonic() - started
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.proxies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=128)
    args = parser.parse_args()
    ray.init(namespace="bench", logging_level="ERROR", include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    loop = asyncio.new_event_loop()
    servers = loop.run_until_complete(serve_endpoints(args.endpoints + 1))
    # The listeners answer from a thread of their own while the driver blocks.
    import threading

    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        result = measure(args.endpoints)
    finally:
        for s in servers:
            loop.call_soon_threadsafe(s.close)
        ray.shutdown()
    result["date"] = datetime.now().isoformat(timespec="minutes")
    result["machine"] = {"cpus": os.cpu_count(), "ray": ray.__version__,
                         "memory_gib": round(psutil.virtual_memory().total / 2**30)}
    table = Table(title=f"proxy actors ({result['date']})")
    table.add_column("")
    table.add_column("value")
    for k, v in result.items():
        if k not in ("machine", "date"):
            table.add_row(k, str(v))
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "proxies.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
