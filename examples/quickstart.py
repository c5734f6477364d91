"""Quick start: a whole fleet on a local Ray, no outside services.

Starts the embedded registry, three reference worker managers (each in a Ray
actor, serving real HTTP on loopback) and the coordinator; then lists supported
models, starts a new model on one worker, restarts a model on all three and
prints each worker's answer, shuts the new model down, and stops everything.

    python examples/quickstart.py        # or: make demo
"""

from __future__ import annotations

import os

import ray
from rich.console import Console
from rich.table import Table

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings

console = Console()


def show(title: str, outputs: list[coordinator.WorkerApplyOutput]) -> None:
    table = Table(title=title)
    for column in ("worker", "ok", "seconds", "message"):
        table.add_column(column)
    for out in outputs:
        ok = "[green]yes[/]" if out.success else "[red]no[/]"
        table.add_row(f"{out.host}:{out.port}", ok, f"{out.timecost:.3f}", out.message)
    console.print(table)


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default: keep authentication on
    ray.init(namespace="quickstart", include_dashboard=False)
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3}]},
        name="quickstart",
        namespace="quickstart",
    )
    registry = cluster.registry_url()
    console.print(f"embedded registry (a DB-GPT controller_addr) at [bold]{registry}[/]")

    host_actor = ray.remote(ReferenceWorkerHost).options(num_cpus=0)
    hosts = [host_actor.remote() for _ in range(3)]
    ports = ray.get([
        h.add.remote(WorkerSettings(controller=registry, heartbeat_interval=1,
                                    models=[SimModel(name="chatgpt-test")]))
        for h in hosts
    ])
    try:
        instances = cluster.wait_for("chatgpt-test", count=3, timeout=30)
        console.print(f"live: {', '.join(f'{i.host}:{i.port}' for i in instances)}")

        for supported in cluster.supported_models():
            names = ", ".join(f"{m.model}@{m.worker_type}" for m in supported.models)
            console.print(f"{supported.host}:{supported.port} supports {names}")

        new_model = coordinator.WorkerStartupRequest(
            host="127.0.0.1", port=ports[0], model="second-model", worker_type="llm",
            params={"name": "second-model", "provider": "proxy/openai"},
        )
        show("startup second-model", [cluster.startup(new_model)])
        cluster.wait_for("second-model", count=1, timeout=30)

        result = cluster.apply("chatgpt-test", "restart")
        show(f"restart chatgpt-test: combined success={result.output.success}", result.outputs)

        show("shutdown second-model", [cluster.shutdown(new_model)])
    finally:
        ray.get([h.stop_all.remote() for h in hosts])
        cluster.stop()
        ray.shutdown()
    console.print("stopped cleanly")


if __name__ == "__main__":
    main()
