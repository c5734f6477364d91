"""Keeping a fleet in shape: deploy a desired state and watch the coordinator
keep it while a worker manager dies.

Starts the embedded registry, four reference worker managers with no models
(each in its own Ray actor, serving real HTTP on loopback) and the coordinator;
deploys ``examples/fleet.yaml``; kills the worker manager of one replica and
waits for the replacement; scales up by one; then undeploys, stopping every
instance, and stops everything.

    python examples/deployments.py [--fleet examples/fleet.yaml]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

import coordinator
from reference_worker import ReferenceWorkerHost, WorkerSettings
from coordinator.driver.cli import read_deployments

console = Console()
HERE = Path(__file__).resolve().parent


def show(cluster: coordinator.Cluster, title: str) -> None:
    table = Table(title=title)
    for column in ("deployment", "desired", "ready", "state", "instances"):
        table.add_column(column)
    for d in cluster.deployments():
        table.add_row(d.key, str(d.replicas), str(d.ready), d.state, ", ".join(d.instances))
    console.print(table)


def wait_ready(cluster: coordinator.Cluster, key: str, count: int, without: str | None = None,
               timeout: float = 60) -> coordinator.DeploymentStatus:
    """Until ``key`` is ready with ``count`` instances (none of them at ``without``)."""
    deadline = time.monotonic() + timeout
    while True:
        status = next(d for d in cluster.deployments() if d.key == key)
        if status.state == "ready" and status.ready == count and without not in status.instances:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: {status.state}, {status.ready} of {count} ready: {status.last_error}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", default=str(HERE / "fleet.yaml"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default: keep authentication on
    ray.init(namespace="deployments-example", include_dashboard=False)
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3}]},
        name="deployments-example", namespace="deployments-example",
    )
    registry = cluster.registry_url()
    # One actor per worker manager, so that killing one kills exactly that manager.
    hosts = [ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote() for _ in range(4)]
    ports = ray.get([h.add.remote(WorkerSettings(controller=registry, heartbeat_interval=1)) for h in hosts])
    by_port = dict(zip(ports, hosts))
    killed: set[int] = set()
    try:
        cluster.wait_for("WorkerManager", count=4, worker_type="service", timeout=30)
        fleet = read_deployments(args.fleet)
        generations = cluster.deploy(*fleet, wait=True, timeout=60)
        console.print(f"deployed {', '.join(f'{d.key} (generation {g})' for d, g in zip(fleet, generations))}")
        show(cluster, "deployed")

        first = fleet[0]
        victim = wait_ready(cluster, first.key, first.replicas).instances[0]
        started = time.monotonic()
        killed.add(int(victim.rsplit(":", 1)[1]))
        ray.kill(by_port[int(victim.rsplit(":", 1)[1])])  # the process dies; nothing deregisters
        console.print(f"killed the worker manager at {victim}")
        healed = wait_ready(cluster, first.key, first.replicas, without=victim)
        console.print(f"{first.key} ready again in {time.monotonic() - started:.1f} s on {', '.join(healed.instances)}")
        for event in healed.events:
            console.print(f"  {event.action} {event.endpoint or ''}: {'ok' if event.ok else 'FAILED'} ({event.reason})")

        bigger = first.model_copy(update={"replicas": first.replicas + 1})
        cluster.deploy(bigger, wait=True, timeout=60)
        show(cluster, f"{first.key} scaled to {bigger.replicas}")
    finally:
        for d in cluster.deployments():
            cluster.undeploy(d.model, d.worker_type, shutdown=True)
        ray.get([h.stop_all.remote() for port, h in by_port.items() if port not in killed])
        cluster.stop()
        ray.shutdown()
    console.print("stopped cleanly")


if __name__ == "__main__":
    main()
