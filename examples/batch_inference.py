"""Batch inference across a fleet: a few hundred prompts through
``RayWorkerManager`` — DB-GPT's worker-manager interface, each request sent
from this process straight to a worker chosen by load among the ones the
coordinator finds alive.

Starts the embedded registry, three reference worker managers serving a chat
model (each in its own Ray actor; they answer with simulated text naming
themselves) and the coordinator; sends the prompts, ``--concurrency`` at a
time, with a progress bar; with ``--kill-one``, kills a worker halfway; prints
per-worker counts and the failures. Only the requests the dead worker was
answering when it died fail (they may have been received, so they are not
resent; each names the worker and the cause): the ones that found its port
closed go to another worker, and from the probes' verdict on (about 2 s) none
is sent to it.

    python examples/batch_inference.py [--prompts 300] [--concurrency 16] [--kill-one]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
from collections import Counter

import ray
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings

console = Console()
MODEL = "chat-model"


async def run_batch(manager: coordinator.RayWorkerManager, prompts: list[str], concurrency: int,
                    on_halfway) -> tuple[Counter[str], list[str]]:
    served: Counter[str] = Counter()
    failed: list[str] = []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    done = 0
    with Progress(console=console) as progress:
        bar = progress.add_task("prompts", total=len(prompts))

        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                prompt = queue.get_nowait()
                answer = await manager.generate({"model": MODEL, "temperature": 0.2, "max_new_tokens": 64,
                                                 "messages": [{"role": "human", "content": prompt}]})
                if answer.success:
                    served[re.match(r"\[([^\]]+)\]", answer.text).group(1)] += 1
                else:
                    failed.append(answer.text)
                done += 1
                progress.advance(bar)
                if done == len(prompts) // 2:
                    on_halfway()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    await manager.aclose()
    return served, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kill-one", action="store_true", help="kill a worker halfway through")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default: keep authentication on
    ray.init(namespace="batch-inference", include_dashboard=False)
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3}]},
        name="batch-inference", namespace="batch-inference",
    )
    hosts = [ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote() for _ in range(3)]
    ray.get([h.add.remote(WorkerSettings(controller=cluster.registry_url(), heartbeat_interval=1,
                                         models=[SimModel(name=MODEL)], chunk_delay=0.005)) for h in hosts])
    killed = []
    try:
        cluster.wait_for(MODEL, count=3, timeout=30)
        manager = coordinator.RayWorkerManager(cluster)

        def halfway() -> None:
            if args.kill_one and not killed:
                killed.append(hosts[-1])
                ray.kill(hosts[-1])  # the worker's process dies mid-batch; nothing deregisters it
                console.print("killed one worker halfway")

        prompts = [f"prompt {i}: say something about the number {i}" for i in range(args.prompts)]
        served, failed = asyncio.run(run_batch(manager, prompts, args.concurrency, halfway))
        table = Table(title=f"{args.prompts} prompts, {args.concurrency} at a time")
        table.add_column("worker")
        table.add_column("answers", justify="right")
        for worker, count in sorted(served.items()):
            table.add_row(worker, str(count))
        console.print(table)
        console.print(f"answered {sum(served.values())}, failed {len(failed)}")
        # Every failure counted once, the same message grouped: the counts add up to the total.
        for text, count in Counter(failed).most_common():
            console.print(f"  {count} failed: {text}", highlight=False, markup=False)
    finally:
        ray.get([h.stop_all.remote() for h in hosts if h not in killed])
        cluster.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
