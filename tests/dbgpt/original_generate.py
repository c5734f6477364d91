"""DB-GPT 0.8.2's own RemoteWorkerManager.generate under load: run with the
DB-GPT virtual environment's Python (bench/traffic.py runs it beside the
coordinator's RayWorkerManager).

    python original_generate.py REGISTRY_URL MODEL CONCURRENCY SECONDS

Prints one JSON object: requests answered, failures, requests/s, p50/p99 ms."""

import asyncio
import json
import statistics
import sys
import time

from dbgpt.model.cluster.controller.controller import ModelRegistryClient
from dbgpt.model.cluster.worker.remote_manager import RemoteWorkerManager


async def main(url: str, model: str, concurrency: int, seconds: float) -> dict:
    manager = RemoteWorkerManager(model_registry=ModelRegistryClient(url))
    params = {"model": model, "messages": [{"role": "human", "content": "hello"}], "temperature": 0.1}
    latencies, failures = [], 0
    await manager.generate(dict(params))  # warm-up
    start = time.monotonic()

    async def caller():
        nonlocal failures
        while time.monotonic() - start < seconds:
            t = time.monotonic()
            out = await manager.generate(dict(params))
            if out.error_code == 0:
                latencies.append(time.monotonic() - t)
            else:
                failures += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"requests": len(latencies), "failures": failures, "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


if __name__ == "__main__":
    url, model, concurrency, seconds = sys.argv[1:]
    print(json.dumps(asyncio.run(main(url, model, int(concurrency), float(seconds)))))
