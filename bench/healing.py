"""How long a deployment stays short after a worker manager dies.

Three reference worker managers run as processes, registered with the embedded
registry; their models take ``--start-delay`` seconds to start (a stand-in for
loading weights). A deployment keeps 2 replicas. Then, ``--kills`` times: the
worker manager of one replica is SIGKILLed, and we time, from the kill,

- **detected**: until the deployment no longer counts that replica (the
  proxies' probes found the worker unreachable),
- **ready again**: until the deployment is ready with 2 replicas elsewhere,

and the killed manager is started again, empty (as DB-GPT's would be), to be
the next spare. The model's own start-up time is measured once, by a direct
``startup``, beside them: ready again ≈ detected + that start-up.

    python -m bench.healing [--kills 7] [--start-delay 2]   # or: make healing

Writes bench/results/healing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import coordinator  # noqa: E402
from bench.detection import spawn  # noqa: E402
from coordinator.core.deployments import Deployment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
console = Console()
KEY = "healed@llm"
PARAMS = {"provider": "proxy/sim"}


def manager(url: str, start_delay: float, port: int = 0):
    return spawn(["reference_worker", "--port", str(port), "--controller", url, "--heartbeat-interval", "1",
                  "--start-delay", str(start_delay)])


def status(cluster: coordinator.Cluster) -> coordinator.DeploymentStatus:
    return next(d for d in cluster.deployments() if d.key == KEY)


def until(condition, timeout: float = 60.0, interval: float = 0.02) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(interval)
    return time.monotonic()


def run(kills: int, start_delay: float) -> dict:
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3}]},
        name="bench-healing", namespace="bench",
    )
    procs = {}
    try:
        url = cluster.registry_url()
        for _ in range(3):
            proc, port = manager(url, start_delay)
            procs[port] = proc
        cluster.wait_for("WorkerManager", count=3, worker_type="service", timeout=30)

        # The model's own start-up through the same path (the second of two:
        # the first also pays for the new proxy's connection).
        spare = max(procs)
        req = {"host": "127.0.0.1", "port": spare, "model": "probe-startup", "worker_type": "llm", "params": PARAMS}
        for _ in range(2):
            began = time.monotonic()
            out = cluster.startup(req)
            startup = time.monotonic() - began
            assert out.success, out.message
            cluster.shutdown(req)

        cluster.deploy(Deployment(model="healed", replicas=2, params=PARAMS), wait=True, timeout=60)
        rows = []
        for i in range(kills):
            st = status(cluster)
            victim = f"127.0.0.1:{min(int(p.rsplit(':', 1)[1]) for p in st.instances)}"
            port = int(victim.rsplit(":", 1)[1])
            killed_at = time.monotonic()
            procs[port].kill()
            procs[port].wait()
            detected = until(lambda: victim not in status(cluster).instances) - killed_at
            ready = until(lambda: (s := status(cluster)).state == "ready" and s.ready == 2
                          and victim not in s.instances) - killed_at
            rows.append({"kill": i + 1, "victim": victim, "detected_s": round(detected, 3),
                         "ready_again_s": round(ready, 3)})
            console.print(f"kill {i + 1}: {victim} detected in {detected:.2f} s, ready again in {ready:.2f} s")
            # Back, empty, as the next spare; let its stale entry expire first.
            procs[port], _ = manager(url, start_delay, port=port)
            until(lambda: len(cluster.instances("WorkerManager", "service")) == 3, timeout=30)
            time.sleep(4)  # past the registry's 3 s heartbeat timeout: the old entry is unhealthy
        return {
            "startup_s": round(startup, 3),
            "start_delay_s": start_delay,
            "kills": rows,
            "median_detected_s": round(statistics.median(r["detected_s"] for r in rows), 3),
            "median_ready_again_s": round(statistics.median(r["ready_again_s"] for r in rows), 3),
            "max_ready_again_s": max(r["ready_again_s"] for r in rows),
        }
    finally:
        for proc in procs.values():
            proc.kill()
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=7)
    parser.add_argument("--start-delay", type=float, default=2.0)
    args = parser.parse_args()
    ray.init(namespace="bench", include_dashboard=False, logging_level="WARNING")
    result = run(args.kills, args.start_delay)
    result.update(date=datetime.now().isoformat(timespec="seconds"), machine=platform.machine(),
                  cpus=os.cpu_count(), probe="every 1 s, dead after 2 failures (1 s timeout)")
    table = Table(title="death of a worker manager -> its replica ready elsewhere (median)")
    for col in ("detected", "model start-up", "ready again", "worst ready again"):
        table.add_column(col)
    table.add_row(f"{result['median_detected_s']:.2f} s", f"{result['startup_s']:.2f} s",
                  f"{result['median_ready_again_s']:.2f} s", f"{result['max_ready_again_s']:.2f} s")
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "healing.json").write_text(json.dumps(result, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
