"""Serving traffic: what the route costs, and DB-GPT's RemoteWorkerManager beside it.

Reference worker managers run as processes on loopback, registered with the
embedded registry.

1. **Throughput of ``generate``**: four workers that each add 20 ms to every
   call; ``--concurrency`` callers for ``--seconds`` each, one contender after
   the other in the same run:
   - the coordinator's ``RayWorkerManager.generate`` (route table followed by
     long poll, local choice, kept-open httpx clients), in this process;
   - DB-GPT 0.8.2's own ``RemoteWorkerManager.generate`` (asks the registry
     over HTTP and opens a new client on every request), in DB-GPT's own
     virtual environment, reading the same registry;
   - raw httpx straight to the workers, round robin (no routing at all).
2. **Streaming**: one worker streaming 8 chunks 10 ms apart; ``--streams``
   sequential streams per contender. First-token latency, and the time per
   chunk after it, for: raw httpx to the worker; ``RayWorkerManager.generate_stream``
   (caller -> worker); and a Ray actor that relays the worker's chunks as a
   Ray streaming generator (caller -> actor -> worker: the other place the
   bytes could flow).

    python -m bench.traffic [--concurrency 32] [--seconds 10] [--streams 200]   # or: make traffic

The load generator is httpx in this process (it is what RayWorkerManager
uses); it shares the 2 cores with the workers. Writes bench/results/traffic.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")

import httpx  # noqa: E402
import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import coordinator  # noqa: E402
from bench.detection import spawn  # noqa: E402
from coordinator.core.inference import ChunkReader  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
console = Console()
CHAT = {"messages": [{"role": "human", "content": "tell me a short story about the sea"}], "temperature": 0.1}


def quantiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100)
    return round(q[49] * 1000, 2), round(q[98] * 1000, 2)


async def load(call, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    failures = 0
    await call()  # warm-up
    start = time.monotonic()

    async def caller():
        nonlocal failures
        while time.monotonic() - start < seconds:
            t = time.monotonic()
            if await call():
                latencies.append(time.monotonic() - t)
            else:
                failures += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    p50, p99 = quantiles(latencies)
    return {"requests": len(latencies), "failures": failures, "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": p50, "p99_ms": p99}


async def throughput_ours(cluster, concurrency: int, seconds: float) -> dict:
    manager = coordinator.RayWorkerManager(cluster)

    async def call():
        return (await manager.generate({"model": "bench-chat", **CHAT})).success

    try:
        return await load(call, concurrency, seconds)
    finally:
        await manager.aclose()


async def throughput_direct(ports: list[int], concurrency: int, seconds: float) -> dict:
    turn = itertools.cycle(ports)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)) as client:
        async def call():
            r = await client.post(f"http://127.0.0.1:{next(turn)}/api/worker/generate",
                                  json={"model": "bench-chat", **CHAT})
            return r.status_code == 200 and r.json()["error_code"] == 0

        return await load(call, concurrency, seconds)


def throughput_dbgpt(registry: str, concurrency: int, seconds: float) -> dict:
    from tests.dbgpt_env import ensure_venv

    python = ensure_venv() / "python"
    done = subprocess.run([str(python), str(ROOT / "tests" / "dbgpt" / "original_generate.py"), registry,
                           "bench-chat", str(concurrency), str(seconds)],
                          capture_output=True, text=True, timeout=seconds * 10 + 120)
    if done.returncode != 0:
        raise RuntimeError(f"DB-GPT's manager failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Relay:
    """The alternative path: a Ray actor that relays a worker's chunks to the
    caller as a Ray streaming generator."""

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(timeout=60)

    async def stream(self, url: str, body: dict):
        reader = ChunkReader()
        async with self._client.stream("POST", url, json=body) as resp:
            async for data in resp.aiter_raw():
                for output in reader.feed(data):
                    yield output.model_dump()


async def timed_stream(chunks) -> tuple[float, float, int]:
    """Seconds to the first chunk, seconds per later chunk, chunks."""
    start = time.monotonic()
    first = last = None
    n = 0
    async for _ in chunks:
        last = time.monotonic()
        first = first or last
        n += 1
    return first - start, (last - first) / max(1, n - 1), n


async def streaming(cluster, port: int, streams: int) -> dict:
    url = f"http://127.0.0.1:{port}/api/worker/generate_stream"
    body = {"model": "bench-stream", **CHAT}
    manager = coordinator.RayWorkerManager(cluster)
    relay = ray.remote(Relay).options(num_cpus=0).remote()

    async with httpx.AsyncClient(timeout=60) as client:
        async def direct():
            reader = ChunkReader()
            async with client.stream("POST", url, json=body) as resp:
                async for data in resp.aiter_raw():
                    for output in reader.feed(data):
                        yield output

        async def relayed():
            async for ref in relay.stream.remote(url, body):
                yield await ref

        contenders = {
            "direct httpx to the worker": direct,
            "RayWorkerManager.generate_stream (caller -> worker)": lambda: manager.generate_stream(body),
            "through a Ray actor (caller -> actor -> worker)": relayed,
        }
        out = {}
        for name, make in contenders.items():
            for _ in range(5):  # warm-up
                await timed_stream(make())
            firsts, per_chunk = [], []
            for _ in range(streams):
                f, c, n = await timed_stream(make())
                assert n == 8, n
                firsts.append(f)
                per_chunk.append(c)
            p50, p99 = quantiles(firsts)
            out[name] = {"first_token_p50_ms": p50, "first_token_p99_ms": p99,
                         "per_chunk_mean_ms": round(statistics.mean(per_chunk) * 1000, 3)}
    await manager.aclose()
    ray.kill(relay)
    base = out["direct httpx to the worker"]
    for row in out.values():
        row["added_first_token_p50_ms"] = round(row["first_token_p50_ms"] - base["first_token_p50_ms"], 2)
        row["added_per_chunk_ms"] = round(row["per_chunk_mean_ms"] - base["per_chunk_mean_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=200)
    args = parser.parse_args()
    ray.init(namespace="bench", include_dashboard=False, logging_level="WARNING")
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "port": 0, "heartbeat_interval": 2, "heartbeat_timeout": 60}]},
        name="bench-traffic", namespace="bench",
    )
    procs = []
    try:
        url = cluster.registry_url()
        chat_ports = []
        for _ in range(4):
            proc, port = spawn(["reference_worker", "--port", "0", "--controller", url, "--model",
                                "bench-chat@llm", "--latency", "0.02", "--heartbeat-interval", "2"])
            procs.append(proc)
            chat_ports.append(port)
        proc, stream_port = spawn(["reference_worker", "--port", "0", "--controller", url, "--model",
                                   "bench-stream@llm", "--chunks", "8", "--chunk-delay", "0.01",
                                   "--heartbeat-interval", "2"])
        procs.append(proc)
        cluster.wait_for("bench-chat", count=4, timeout=30)
        cluster.wait_for("bench-stream", count=1, timeout=30)
        deadline = time.monotonic() + 30
        while sum(1 for r in cluster.status().instances if r.reachable) < 10 and time.monotonic() < deadline:
            time.sleep(0.2)

        rows = {}
        console.print("generate: RayWorkerManager ...")
        rows["RayWorkerManager (this project)"] = asyncio.run(throughput_ours(cluster, args.concurrency, args.seconds))
        console.print("generate: DB-GPT's RemoteWorkerManager ...")
        rows["DB-GPT 0.8.2 RemoteWorkerManager"] = throughput_dbgpt(url, args.concurrency, args.seconds)
        console.print("generate: raw httpx ...")
        rows["raw httpx, round robin (no routing)"] = asyncio.run(throughput_direct(chat_ports, args.concurrency,
                                                                             args.seconds))
        console.print("streaming ...")
        stream_rows = asyncio.run(streaming(cluster, stream_port, args.streams))
    finally:
        for proc in procs:
            proc.kill()
        cluster.stop()
        ray.shutdown()

    ours, theirs = rows["RayWorkerManager (this project)"], rows["DB-GPT 0.8.2 RemoteWorkerManager"]
    ratio = round(ours["rps"] / theirs["rps"], 1) if theirs["rps"] else None
    table = Table(title=f"generate: 4 workers adding 20 ms, {args.concurrency} callers, {args.seconds:g} s each")
    for col in ("contender", "requests/s", "p50 ms", "p99 ms", "failures"):
        table.add_column(col)
    for name, r in rows.items():
        table.add_row(name, str(r["rps"]), str(r["p50_ms"]), str(r["p99_ms"]), str(r["failures"]))
    console.print(table)
    console.print(f"RayWorkerManager / DB-GPT: {ratio}x the requests/s")
    table = Table(title=f"streaming: 8 chunks 10 ms apart, {args.streams} sequential streams each")
    for col in ("path", "first token p50 ms", "p99 ms", "added p50 ms", "per chunk ms", "added per chunk ms"):
        table.add_column(col)
    for name, r in stream_rows.items():
        table.add_row(name, str(r["first_token_p50_ms"]), str(r["first_token_p99_ms"]),
                      str(r["added_first_token_p50_ms"]), str(r["per_chunk_mean_ms"]), str(r["added_per_chunk_ms"]))
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "traffic.json").write_text(json.dumps({
        "date": datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(), "cpus": os.cpu_count(),
        "concurrency": args.concurrency, "seconds": args.seconds, "generate": rows, "ratio_vs_dbgpt": ratio,
        "streaming": stream_rows, "load_generator": "httpx (in-process)",
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
