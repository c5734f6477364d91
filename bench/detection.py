"""How fast the coordinator notices a dead worker, and a new one.

1. Detection: K reference-worker processes register with a controller that uses
   DB-GPT's heartbeat defaults (workers beat every 20 s; the controller checks
   every 20 s and expires after 60 s). The workers are killed (SIGKILL) a few
   seconds apart; for each we time (a) until ``Cluster.instances(healthy_only=True)``
   excludes it (the proxies' probes) and (b) until the controller itself lists it
   unhealthy (DB-GPT's way). Both are measured in the same run.
2. Registration: the time from a POST to a registry until the instance is in
   the coordinator's live set — the embedded registry (long poll) and a
   DB-GPT-protocol controller polled every second.

    python -m bench.detection [--workers 5] [--registrations 20]

Writes bench/results/detection.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import IO

import httpx
import ray
from rich.console import Console
from rich.table import Table

import coordinator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
console = Console()


def spawn(args: list[str], stderr: IO[str] | None = None) -> tuple[subprocess.Popen, int]:
    """``python -m <args>`` that prints ``listening on host:port`` once it serves;
    the process and its port. ``stderr``: where its logs go (default: ours)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr,
                            text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc, int(line.strip().rsplit(":", 1)[1])


def controller_healthy_ports(url: str) -> set[int]:
    rows = httpx.get(f"{url}/api/controller/models", params={"healthy_only": True}).json()
    return {r["port"] for r in rows if r["model_name"] == "det@llm"}


def detection(workers: int, spacing: float) -> dict:
    ctl, ctl_port = spawn(["actors.registry", "--port", "0", "--heartbeat-interval", "20", "--heartbeat-timeout", "60"])
    url = f"http://127.0.0.1:{ctl_port}"
    procs = []
    cluster = coordinator.start(
        {"registries": [{"kind": "dbgpt", "name": "dbgpt", "url": url, "poll_interval": 1}]},
        name="bench-detection", namespace="bench",
    )
    try:
        for _ in range(workers):
            procs.append(spawn(["reference_worker", "--controller", url, "--model", "det@llm",
                                "--heartbeat-interval", "20"]))
        cluster.wait_for("det", count=workers, timeout=60)
        ports = [port for _, port in procs]
        # every proxy has probed its worker at least once
        deadline = time.monotonic() + 60
        while any(r.reachable is not True for r in cluster.status().instances):
            assert time.monotonic() < deadline, "proxies never became ready"
            time.sleep(0.1)

        killed_at: dict[int, float] = {}
        probe_seen: dict[int, float] = {}
        registry_seen: dict[int, float] = {}
        next_kill = time.monotonic()
        with console.status("killing workers and watching both views…"):
            while len(registry_seen) < workers:
                now = time.monotonic()
                if len(killed_at) < workers and now >= next_kill:
                    proc, port = procs[len(killed_at)]
                    proc.kill()
                    killed_at[port] = time.monotonic()
                    next_kill = now + spacing
                live = {i.port for i in cluster.instances("det")}
                for port in killed_at:
                    if port not in live and port not in probe_seen:
                        probe_seen[port] = time.monotonic()
                healthy = controller_healthy_ports(url)
                for port in killed_at:
                    if port not in healthy and port not in registry_seen:
                        registry_seen[port] = time.monotonic()
                time.sleep(0.05)
        probe = [probe_seen[p] - killed_at[p] for p in ports]
        registry = [registry_seen[p] - killed_at[p] for p in ports]
    finally:
        cluster.stop()
        for proc, _ in procs:
            proc.kill()
        ctl.kill()
    return {"probe_s": probe, "dbgpt_registry_s": registry}


def registration(count: int) -> dict:
    ctl, ctl_port = spawn(["actors.registry", "--port", "0"])
    url = f"http://127.0.0.1:{ctl_port}"
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "name": "emb", "port": 0},
                        {"kind": "dbgpt", "name": "dbgpt", "url": url, "poll_interval": 1}]},
        name="bench-registration", namespace="bench",
    )
    out: dict[str, list[float]] = {"embedded_s": [], "dbgpt_polled_1s_s": []}
    try:
        targets = {"embedded_s": cluster.registry_url(), "dbgpt_polled_1s_s": url}

        async def one(target: str, i: int) -> float:
            model = f"reg-{i}-{abs(hash(target)) % 1000}"
            waiting = asyncio.ensure_future(cluster.aio.wait_for(model, 1, timeout=30))
            await asyncio.sleep(0.2)  # the wait is in place
            async with httpx.AsyncClient() as client:
                started = time.monotonic()
                await client.post(f"{target}/api/controller/models", json={
                    "model_name": f"{model}@llm", "host": "127.0.0.1", "port": 10000 + i, "check_healthy": False})
            await waiting
            return time.monotonic() - started

        for i in range(count):
            for key, target in targets.items():
                out[key].append(asyncio.run(one(target, i)))
    finally:
        cluster.stop()
        ctl.kill()
    return out


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "max": max(xs), "min": min(xs), "n": len(xs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=5)
    parser.add_argument("--spacing", type=float, default=3.0, help="seconds between kills")
    parser.add_argument("--registrations", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(namespace="bench", include_dashboard=False, logging_level="WARNING")
    try:
        det = detection(args.workers, args.spacing)
        reg = registration(args.registrations)
    finally:
        ray.shutdown()

    probe, registry = summary(det["probe_s"]), summary(det["dbgpt_registry_s"])
    table = Table(title="Noticing a killed worker (seconds after SIGKILL)")
    for col in ("view", "median", "max", "n"):
        table.add_column(col)
    table.add_row("coordinator (probes, defaults)", f"{probe['median']:.2f}", f"{probe['max']:.2f}", str(probe["n"]))
    table.add_row("DB-GPT registry (20 s beats, 60 s timeout)", f"{registry['median']:.2f}",
                  f"{registry['max']:.2f}", str(registry["n"]))
    ratio = registry["median"] / probe["median"]
    table.add_row("ratio (registry / coordinator)", f"{ratio:.1f}x", "", "")
    console.print(table)
    table = Table(title="Registration to dispatchable (seconds)")
    for col in ("registry", "median", "max", "n"):
        table.add_column(col)
    for key, xs in reg.items():
        s = summary(xs)
        table.add_row(key.removesuffix("_s"), f"{s['median']:.3f}", f"{s['max']:.3f}", str(s["n"]))
    console.print(table)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "detection.json").write_text(json.dumps({
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "detection": {"raw": det, "coordinator": probe, "dbgpt_registry": registry, "ratio_median": ratio},
        "registration": {k: {"raw": v, **summary(v)} for k, v in reg.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
