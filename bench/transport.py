"""httpx's default transport against httpx-aiohttp's ``AiohttpTransport``, in the
proxy, on the suite's kind of work: the proxy's own apply path (``WorkerProxy``
in this process, no Ray) against reference workers, one run, side by side.

Figures per transport: client CPU per request (this process's CPU time over
the requests it made), latency of sequential applies (p50/p99), and a
fan-out of 32 concurrent applies (requests/s). Then a behaviour check that
matters more than speed: a worker that reads the request and closes the
connection without answering (a worker killed mid-call). The proxy must
report that as "connection lost" and never resend it; the check shows which
httpx exception each transport raises for it.

    python -m bench.transport [--requests 2000]

(Needs the bench extra: pip install -e '.[bench]'.) Writes bench/results/transport.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from actors.proxy import WorkerProxy
from coordinator.core.config import ProbeSettings
from coordinator.core.models import WorkerApplyRequest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKERS = 8
console = Console()


def transports() -> dict[str, callable]:
    from httpx_aiohttp import AiohttpTransport

    return {"httpx default": lambda: None, "httpx-aiohttp": lambda: AiohttpTransport()}


def spawn_workers(n: int) -> list[tuple[subprocess.Popen, int]]:
    out = []
    for _ in range(n):
        proc = subprocess.Popen([sys.executable, "-m", "reference_worker", "--port", "0", "--model", "m"],
                                cwd=ROOT, stdout=subprocess.PIPE, text=True)
        out.append((proc, int(proc.stdout.readline().rsplit(":", 1)[1])))
    return out


async def workload(make, ports: list[int], requests: int) -> dict:
    proxies = [WorkerProxy("127.0.0.1", p, probe=ProbeSettings(enabled=False), transport=make()) for p in ports]
    wire = WorkerApplyRequest(model="m", apply_type="start").model_dump_json()
    try:
        for proxy in proxies:  # warm: connections open, every call succeeds
            assert (await proxy.apply(wire)).success
        cpu, started = time.process_time(), time.perf_counter()
        latencies = []
        for i in range(requests):
            t = time.perf_counter()
            out = await proxies[i % len(proxies)].apply(wire)
            latencies.append(time.perf_counter() - t)
            assert out.success, out.message
        sequential_cpu = (time.process_time() - cpu) / requests
        rounds = max(1, requests // 32)
        cpu, started = time.process_time(), time.perf_counter()
        for _ in range(rounds):
            outs = await asyncio.gather(*(proxies[j % len(proxies)].apply(wire) for j in range(32)))
            assert all(o.success for o in outs)
        fan_seconds = time.perf_counter() - started
        fan_cpu = (time.process_time() - cpu) / (rounds * 32)
    finally:
        for proxy in proxies:
            await proxy.close()
    latencies.sort()
    return {
        "client_cpu_ms_per_request_sequential": round(sequential_cpu * 1000, 3),
        "client_cpu_ms_per_request_fanout": round(fan_cpu * 1000, 3),
        "sequential_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "sequential_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "fanout_32_requests_per_s": round(rounds * 32 / fan_seconds),
    }


async def dropped_mid_call(make) -> str:
    """A server that reads the request, then closes without answering."""
    async def accept(reader, writer):
        await reader.read(65536)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(transport=make()) as client:
            await client.post(f"http://127.0.0.1:{port}/api/worker/apply", json={})
        return "no error"
    except httpx.HTTPError as exc:
        return type(exc).__name__
    finally:
        server.close()


async def main_async(requests: int) -> dict:
    workers = spawn_workers(WORKERS)
    ports = [p for _, p in workers]
    rows = {}
    try:
        for name, make in transports().items():  # interleaved twice: the machine is noisy
            rows.setdefault(name, []).append(await workload(make, ports, requests))
        for name, make in reversed(list(transports().items())):
            rows[name].append(await workload(make, ports, requests))
        drops = {name: await dropped_mid_call(make) for name, make in transports().items()}
    finally:
        for proc, _ in workers:
            proc.kill()
            proc.wait()
    merged = {name: {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
              for name, runs in rows.items()}
    for name in merged:
        merged[name]["worker killed mid-call raises"] = drops[name]
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    result = asyncio.run(main_async(args.requests))
    table = Table(title="the proxy's HTTP transport (one run, medians of two interleaved rounds)")
    table.add_column("")
    for name in result:
        table.add_column(name)
    for key in next(iter(result.values())):
        table.add_row(key, *(str(result[name][key]) for name in result))
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transport.json").write_text(json.dumps(
        {"date": datetime.now().isoformat(timespec="minutes"), "cpus": os.cpu_count(), "requests": args.requests,
         "workers": WORKERS, "transports": result}, indent=2))


if __name__ == "__main__":
    main()
