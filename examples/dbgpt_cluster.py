"""Drive an existing DB-GPT cluster: follow its model controller and list, inspect
and restart what its worker managers run.

    python examples/dbgpt_cluster.py --controller http://10.0.0.5:8000
    python examples/dbgpt_cluster.py --controller http://10.0.0.5:8000 --restart chatgpt-test

Connects to the Ray cluster in RAY_ADDRESS, or starts a local Ray.
"""

from __future__ import annotations

import argparse
import os
import sys

import ray
from rich.console import Console
from rich.table import Table

import coordinator

console = Console()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controller", required=True, help="DB-GPT controller URL")
    parser.add_argument("--restart", metavar="MODEL", help="restart this model on every worker that runs it")
    parser.add_argument("--worker-type", default="llm")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(namespace="examples")
    cluster = coordinator.start(
        {"registries": [{"kind": "dbgpt", "name": "dbgpt", "url": args.controller, "poll_interval": 1}]},
        name="dbgpt-example", namespace="examples",
    )
    try:
        cluster.wait_for("WorkerManager", count=1, worker_type="service", timeout=30)
        status = cluster.status()
        table = Table(title=f"instances at {args.controller}")
        for col in ("model", "type", "worker", "registry", "probe"):
            table.add_column(col)
        for r in status.instances:
            table.add_row(r.model, r.worker_type, f"{r.host}:{r.port}",
                          "healthy" if r.registry_healthy else "unhealthy",
                          {True: "reachable", False: "unreachable", None: "-"}[r.reachable])
        console.print(table)
        for supported in cluster.supported_models():
            names = ", ".join(f"{m.model} ({m.provider})" for m in supported.models)
            console.print(f"{supported.host}:{supported.port} can run: {names}")
        if args.restart:
            result = cluster.apply(args.restart, "restart", worker_type=args.worker_type)
            for out in result.outputs:
                console.print(f"{out.host}:{out.port} {'ok' if out.success else 'FAILED'}: {out.message}")
            return 0 if result.success else 1
        return 0
    finally:
        cluster.stop()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
