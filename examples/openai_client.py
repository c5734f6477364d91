"""OpenAI's own client against the fleet, through the gateway.

Starts the embedded registry, two reference worker managers serving a chat
model and one serving an embedding model (each in a Ray actor), the
coordinator and its gateway (``cluster.serve()``); then talks to the fleet
exactly as any OpenAI application would — a chat completion, a streamed one,
an embedding, the model list — and shows which worker each chat answer came
from and why the gateway chose it (the requests share a long system prompt,
so the cache-aware router keeps them where that prefix is cached).

    python examples/openai_client.py [--requests 20]
"""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter

import openai
import ray
from rich.console import Console
from rich.table import Table

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings

console = Console()
SYSTEM = "You are the fleet's assistant. " * 40  # a long shared system prompt, as multi-tenant chat has


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default: keep authentication on
    ray.init(namespace="openai-client", include_dashboard=False)
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 5}]},
        name="openai-client", namespace="openai-client",
    )
    hosts = [ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote() for _ in range(3)]
    url = cluster.registry_url()
    models = [SimModel(name="chat")], [SimModel(name="chat")], [SimModel(name="embed", worker_type="text2vec")]
    ray.get([h.add.remote(WorkerSettings(controller=url, heartbeat_interval=1, models=m, chunk_delay=0.01))
             for h, m in zip(hosts, models)])
    try:
        cluster.wait_for("chat", count=2, timeout=30)
        cluster.wait_for("embed", count=1, worker_type="text2vec", timeout=30)
        base = cluster.serve(port=0)  # the gateway: OpenAI's API over the fleet
        console.print(f"gateway at {base}/v1")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused-on-loopback")

        answer = client.chat.completions.create(
            model="chat", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}])
        console.print(f"chat: {answer.choices[0].message.content}")
        streamed = client.chat.completions.create(
            model="chat", stream=True, messages=[{"role": "user", "content": "stream please"}])
        console.print("streamed: " + "".join(c.choices[0].delta.content or "" for c in streamed if c.choices))
        vectors = client.embeddings.create(model="embed", input=["fleet", "gateway"])
        console.print(f"embeddings: {len(vectors.data)} vectors of {len(vectors.data[0].embedding)}")
        console.print(f"models: {', '.join(sorted(m.id for m in client.models.list().data))}")

        served: Counter[str] = Counter()
        for i in range(args.requests):
            reply = client.chat.completions.create(
                model="chat", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"q{i}"}])
            served[re.match(r"\[([^\]]+)\]", reply.choices[0].message.content).group(1)] += 1
        gateway = ray.get_actor("openai-client/gateway/0", namespace="openai-client")
        stats = ray.get(gateway.stats.remote())
        table = Table(title=f"{args.requests} chats sharing a system prompt")
        table.add_column("worker")
        table.add_column("answers", justify="right")
        for worker, count in sorted(served.items()):
            table.add_row(worker, str(count))
        console.print(table)
        console.print("routing decisions: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["reasons"].items())))
    finally:
        ray.get([h.stop_all.remote() for h in hosts])
        cluster.stop(forget=True)
        ray.shutdown()
        console.print("stopped cleanly")


if __name__ == "__main__":
    main()
