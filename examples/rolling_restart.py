"""Rolling restart: restart a model across a fleet a few instances at a time,
waiting after each batch until its instances are healthy again, and stopping at
the first batch that fails.

    python examples/rolling_restart.py                 # on a demo fleet of 5 local workers

Against your own coordinator, the same two calls:

    cluster = coordinator.attach("dbgpt-coordinator", namespace="dbgpt")
    cluster.apply("chatgpt-test", "restart", max_unavailable=2, dry_run=True)   # the plan
    cluster.apply("chatgpt-test", "restart", max_unavailable=2)                 # do it

or from a terminal:  coordinator apply chatgpt-test restart --max-unavailable 2 [--dry-run]
"""

from __future__ import annotations

import os

import ray

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(namespace="examples")
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3}]},
        name="rolling-example", namespace="examples",
    )
    host = ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote()
    try:
        registry = cluster.registry_url()
        ports = ray.get([host.add.remote(WorkerSettings(
            controller=registry, heartbeat_interval=1, start_delay=0.2, models=[SimModel(name="chatgpt-test")]))
            for _ in range(5)])
        cluster.wait_for("chatgpt-test", count=5, timeout=60)

        plan = cluster.apply("chatgpt-test", "restart", max_unavailable=2, dry_run=True)
        print(f"plan: {plan.instances} instances in {len(plan.batches)} batches (nothing sent)")
        for i, batch in enumerate(plan.batches, 1):
            print(f"  batch {i}: {', '.join(f'{h}:{p}' for h, p in batch)}")

        result = cluster.apply("chatgpt-test", "restart", max_unavailable=2)
        print(f"rolling restart: success={result.success}")
        for out in result.outputs:
            print(f"  {out.host}:{out.port}  {'ok ' if out.success else 'FAILED'}  {out.message}")

        # A worker that fails its restart stops the rollout at its batch.
        ray.get(host.set_faults.remote(sorted(ports)[2], fail_next=1))
        result = cluster.apply("chatgpt-test", "restart", max_unavailable=2)
        print(f"rolling restart with a failing worker: success={result.success}")
        for out in result.outputs:
            print(f"  {out.host}:{out.port}  {'ok ' if out.success else 'FAILED'}  {out.message}")
    finally:
        ray.get(host.stop_all.remote())
        ray.kill(host)
        cluster.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
