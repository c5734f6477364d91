"""The scale benchmark: the embedded registry and the live set at fleet size,
beside DB-GPT 0.8.2's own controller, in one run.

For 1,000, 5,000 and 10,000 entries (20 worker endpoints x N/20 models, as a
fleet of worker managers registers them), growing one registry:

- registration rate (closed loop, 32 in flight);
- heartbeats at 500/s and 1,000/s (open loop): achieved rate, p50/p99 latency
  measured from when each was due, errors;
- under the 1,000/s load, the time from sending a registration to the
  coordinator's live set holding it (``cluster.aio.wait_for`` long-polls the
  coordinator, the same state ``cluster.instances()`` reads);
- coordinator and watcher CPU per change (300 registrations, idle CPU of the
  same span subtracted);
- memory (RSS) of the registry, watcher and coordinator actors;

and for DB-GPT's controller (run from the DB-GPT environment the tests build)
the registration and heartbeat figures, then a coordinator following it with
``kind: dbgpt`` (polled every second) under 500 heartbeats/s: the watcher's CPU
per poll and how many versions it shipped (heartbeats alone should ship none).

The load generator is aiohttp (bench/loadgen.py), in this process, on the same
two cores as everything it measures.

    python -m bench.scale [--sizes 1000,5000,10000] [--seconds 10]     # or: make scale

Prints tables, writes bench/results/scale.json and bench/results/scale.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import time
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import aiohttp
import psutil

# Token auth on, as the tests and a deployment have it; Ray reads this when imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
import ray  # noqa: E402
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import coordinator
from bench import loadgen
from coordinator.core.naming import registry_actor, watcher_actor

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ENDPOINTS = 20
FIRST_PORT = 21000
CPU_CHANGES = 300
VISIBILITY_SAMPLES = 8
console = Console()


def entry(i: int) -> dict:
    return {"model_name": f"m{i // ENDPOINTS}@llm", "host": "127.0.0.1", "port": FIRST_PORT + i % ENDPOINTS,
            "weight": 1.0, "check_healthy": True, "healthy": True, "enabled": True}


def managers() -> list[dict]:
    """The worker-manager entries of the 20 endpoints, registered first, as a
    fleet's worker managers register themselves before their models."""
    return [{**entry(i), "model_name": "WorkerManager@service"} for i in range(ENDPOINTS)]


def extra(name: str, i: int = 0) -> dict:
    """An entry registered while measuring; nobody heartbeats it, so it does
    not expire (an expiry would be a change of its own, counted against the
    measured ones)."""
    return {**entry(i), "model_name": f"{name}@llm", "check_healthy": False}


@asynccontextmanager
async def listeners():
    """Something listening on every worker endpoint, so the proxies' probes find
    them reachable (a probe is a TCP connect)."""
    async def accept(reader, writer):
        writer.close()

    servers = [await asyncio.start_server(accept, "127.0.0.1", FIRST_PORT + i) for i in range(ENDPOINTS)]
    try:
        yield
    finally:
        for s in servers:
            s.close()


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def rss_mib(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def pid_of(actor) -> int:
    return ray.get(actor.process_info.remote(), timeout=30)["pid"]


async def post(http: aiohttp.ClientSession, url: str, body: dict) -> None:
    async with http.post(f"{url}/api/controller/models", json=body) as r:
        r.raise_for_status()
        await r.read()


async def visibility(cluster, url: str, size: int) -> list[float]:
    """Seconds from sending a registration to the coordinator's live set holding it."""
    seen = []
    async with aiohttp.ClientSession() as http:
        for k in range(VISIBILITY_SAMPLES):
            name = f"visible-{size}-{k}"
            waiting = asyncio.ensure_future(cluster.aio.wait_for(name, count=1, timeout=10))
            await asyncio.sleep(0.1)  # the wait is in place at the coordinator
            started = time.perf_counter()
            await post(http, url, extra(name, k))
            await waiting
            seen.append(time.perf_counter() - started)
            await asyncio.sleep(0.4)
    return seen


async def cpu_per_change(url: str, pids: dict[str, int], size: int) -> dict[str, float]:
    """CPU seconds per change of each process, idle CPU of an equal span subtracted."""
    pace = 0.01
    span = CPU_CHANGES * pace
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    await asyncio.sleep(span)
    idle = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
    async with aiohttp.ClientSession() as http:
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        started = time.perf_counter()
        for i in range(CPU_CHANGES):
            await post(http, url, extra(f"cpu-{size}-{i}", i))
            await asyncio.sleep(max(0.0, started + (i + 1) * pace - time.perf_counter()))
        await asyncio.sleep(0.5)  # let the last changes travel
        busy = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
    scale = span / (time.perf_counter() - started)
    return {k: round(max(0.0, busy[k] - idle[k] / scale) / CPU_CHANGES * 1e6, 1) for k in pids}  # µs


async def probed(cluster, endpoints: int, timeout: float = 180) -> None:
    """Until every endpoint's proxy has started and probed its worker (proxies
    start one by one, about a second of CPU each on this machine: not while
    something is being timed)."""
    deadline = time.monotonic() + timeout
    while True:
        status = await cluster.aio.status()
        if sum(1 for i in status.instances if i.reachable) >= endpoints:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"proxies of {endpoints} endpoints did not all report within {timeout} s")
        await asyncio.sleep(0.5)


async def wait_count(watcher, want: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (await watcher.status.remote()).instances < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"watcher did not reach {want} instances")
        await asyncio.sleep(0.2)


async def bench_embedded(sizes: list[int], seconds: float, progress, task) -> list[dict]:
    # The blocking face of the driver API, off the event loop.
    cluster = await asyncio.to_thread(
        coordinator.start, {"registries": [{"kind": "embedded", "name": "fleet", "port": 0}]},
        name="scale", namespace="bench")
    rows = []
    try:
        url = await asyncio.to_thread(cluster.registry_url)
        coord = ray.get_actor("scale", namespace="bench")
        watcher = ray.get_actor(watcher_actor("scale", "fleet"), namespace="bench")
        registry = ray.get_actor(registry_actor("scale", "fleet"), namespace="bench")
        pids = {"registry": pid_of(registry), "watcher": pid_of(watcher), "coordinator": pid_of(coord)}
        # The endpoints' proxies start here, not during the timed registrations.
        await loadgen.register_all(url, loadgen.bodies(managers()))
        await probed(cluster, ENDPOINTS)
        registered = 0
        for size in sizes:
            payloads = loadgen.bodies([entry(i) for i in range(registered, size)])
            reg = await loadgen.register_all(url, payloads)
            registered = size
            await wait_count(watcher, size + ENDPOINTS)
            progress.advance(task)
            every = loadgen.bodies(managers() + [entry(i) for i in range(size)])
            hb500 = await loadgen.heartbeat_at(url, every, 500, seconds)
            progress.advance(task)
            hb1000 = await loadgen.heartbeat_at(url, every, 1000, seconds,
                                                during=lambda: visibility(cluster, url, size))
            progress.advance(task)
            cpu = await cpu_per_change(url, pids, size)
            progress.advance(task)
            rows.append({
                "contender": "embedded", "entries": size, "register": reg.summary(),
                "heartbeat_500": hb500.summary(), "heartbeat_1000": hb1000.summary(),
                "visible_ms": [round(s * 1000, 1) for s in hb1000.extra],
                "visible_median_ms": round(statistics.median(hb1000.extra) * 1000, 1),
                "visible_max_ms": round(max(hb1000.extra) * 1000, 1),
                "cpu_us_per_change": cpu,
                "rss_mib": {k: rss_mib(p) for k, p in pids.items()},
            })
    finally:
        await asyncio.to_thread(cluster.stop)
    return rows


def start_dbgpt_controller(port: int) -> subprocess.Popen:
    from tests.dbgpt_env import ensure_venv

    python = ensure_venv() / "python"
    proc = subprocess.Popen([str(python), "tests/dbgpt/controller.py", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code < 500:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("DB-GPT's controller did not start")


def screening_cost(url: str) -> dict:
    """In this process, what a watcher spends on one poll's answer beyond the
    HTTP exchange: parsing the JSON, and screening it against the last poll
    (an unchanged listing: no entry is validated again)."""
    import httpx

    from actors.sources import DbgptControllerSource
    from coordinator.core.config import DbgptSource

    body = httpx.get(f"{url}/api/controller/models", timeout=60).content
    source = DbgptControllerSource(DbgptSource(url=url))
    source._screen(json.loads(body))  # the first listing: every entry validated
    rounds = 5
    started = time.process_time()
    for _ in range(rounds):
        parsed = json.loads(body)
    parse = (time.process_time() - started) / rounds
    started = time.process_time()
    for _ in range(rounds):
        source._screen(json.loads(body))
    screen = (time.process_time() - started) / rounds - parse
    return {"listing_mib": round(len(body) / 2**20, 2), "parse_ms": round(parse * 1000, 1),
            "screen_unchanged_ms": round(screen * 1000, 1), "parsed_entries": len(parsed)}


async def poll_cost(url: str, size: int, seconds: float, payloads: list[bytes]) -> dict:
    """A coordinator following DB-GPT's controller (polled every second) while
    500 heartbeats/s arrive there: watcher CPU per poll, versions shipped."""
    name = f"scale-dbgpt-{size}"
    cluster = await asyncio.to_thread(
        coordinator.start, {"registries": [{"kind": "dbgpt", "name": "dbgpt", "urls": [url], "poll_interval": 1.0}],
                            "probe": {"enabled": False}},
        name=name, namespace="bench")
    try:
        watcher = ray.get_actor(watcher_actor(name, "dbgpt"), namespace="bench")
        coord = ray.get_actor(name, namespace="bench")
        await wait_count(watcher, size + ENDPOINTS)
        wpid, cpid = pid_of(watcher), pid_of(coord)
        before = await watcher.status.remote()
        wcpu, ccpu = cpu_seconds(wpid), cpu_seconds(cpid)
        await loadgen.heartbeat_at(url, payloads, 500, seconds)
        after = await watcher.status.remote()
        polls = after.fetches - before.fetches
        shipped_heartbeats = after.version - before.version
        # One real change, to show a change still travels.
        async with aiohttp.ClientSession() as http:
            started = time.perf_counter()
            await post(http, url, extra(f"polled-{size}"))
            await cluster.aio.wait_for(f"polled-{size}", count=1, timeout=10)
            visible = time.perf_counter() - started
        final = await watcher.status.remote()
        return {
            **screening_cost(url),
            "polls": polls,
            "watcher_cpu_ms_per_poll": round((cpu_seconds(wpid) - wcpu) / max(polls, 1) * 1000, 1),
            "coordinator_cpu_ms_per_s": round((cpu_seconds(cpid) - ccpu) / seconds * 1000, 2),
            "versions_shipped_by_heartbeats": shipped_heartbeats,
            "versions_shipped_by_one_registration": final.version - after.version,
            "registration_visible_ms": round(visible * 1000, 1),
            "watcher_rss_mib": rss_mib(wpid),
        }
    finally:
        await asyncio.to_thread(cluster.stop)


async def bench_dbgpt(sizes: list[int], seconds: float, progress, task) -> list[dict]:
    from tests.conftest import free_port

    port = free_port()
    proc = start_dbgpt_controller(port)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        await loadgen.register_all(url, loadgen.bodies(managers()))
        registered = 0
        for size in sizes:
            reg = await loadgen.register_all(url, loadgen.bodies([entry(i) for i in range(registered, size)]))
            registered = size
            progress.advance(task)
            every = loadgen.bodies(managers() + [entry(i) for i in range(size)])
            hb500 = await loadgen.heartbeat_at(url, every, 500, seconds)
            progress.advance(task)
            hb1000 = await loadgen.heartbeat_at(url, every, 1000, seconds)
            progress.advance(task)
            polled = await poll_cost(url, size, seconds, every)
            progress.advance(task)
            rows.append({
                "contender": "dbgpt", "entries": size, "register": reg.summary(),
                "heartbeat_500": hb500.summary(), "heartbeat_1000": hb1000.summary(),
                "rss_mib": {"controller": rss_mib(proc.pid)}, "polled": polled,
            })
    finally:
        proc.kill()
        proc.wait()
    return rows


def titled(title: str, *columns: str) -> Table:
    t = Table(title=title)
    for col in columns:
        t.add_column(col)
    return t


def table(rows: list[dict]) -> Table:
    t = titled("registries at fleet size (same run, same load generator)",
               "registry", "entries", "register/s", "hb 500/s: p50 / p99 ms (err)",
               "hb 1000/s: p50 / p99 ms (err)", "visible (median / max ms)", "RSS MiB")
    for r in rows:
        h5, h1 = r["heartbeat_500"], r["heartbeat_1000"]
        t.add_row(
            "embedded (this project)" if r["contender"] == "embedded" else "DB-GPT 0.8.2 controller",
            f"{r['entries']:,}", f"{r['register']['rate']:,.0f}",
            f"{h5['rate']:.0f}/s: {h5['p50_ms']} / {h5['p99_ms']} ({h5['errors']})",
            f"{h1['rate']:.0f}/s: {h1['p50_ms']} / {h1['p99_ms']} ({h1['errors']})",
            f"{r['visible_median_ms']} / {r['visible_max_ms']}" if "visible_median_ms" in r else "—",
            ", ".join(f"{k} {v}" for k, v in r["rss_mib"].items()),
        )
    return t


def cost_table(rows: list[dict]) -> Table:
    t = titled("what a change costs downstream",
               "entries", "coordinator µs/change", "watcher µs/change", "registry µs/change",
               "DB-GPT poll: watcher CPU ms/poll (parse + screen)", "versions shipped by 500 hb/s",
               "polled change visible ms")
    ours = {r["entries"]: r for r in rows if r["contender"] == "embedded"}
    theirs = {r["entries"]: r for r in rows if r["contender"] == "dbgpt"}
    for size in sorted(ours.keys() | theirs.keys()):
        o, p = ours.get(size), theirs.get(size, {}).get("polled")
        t.add_row(
            f"{size:,}",
            *(str(o["cpu_us_per_change"][k]) if o else "—" for k in ("coordinator", "watcher", "registry")),
            f"{p['watcher_cpu_ms_per_poll']} ({p['parse_ms']} + {p['screen_unchanged_ms']})" if p else "—",
            str(p["versions_shipped_by_heartbeats"]) if p else "—",
            str(p["registration_visible_ms"]) if p else "—",
        )
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for contender, label in (("embedded", "embedded registry"), ("dbgpt", "DB-GPT controller")):
        rs = [r for r in rows if r["contender"] == contender]
        if not rs:
            continue
        xs = [r["entries"] for r in rs]
        a.plot(xs, [r["heartbeat_1000"]["p99_ms"] for r in rs], marker="o", label=f"{label}: p99 at 1000 hb/s")
        a.plot(xs, [r["register"]["rate"] / 100 for r in rs], marker="s", linestyle="--",
               label=f"{label}: registrations/s ÷ 100")
    ours = [r for r in rows if r["contender"] == "embedded"]
    if ours:
        xs = [r["entries"] for r in ours]
        for k in ("coordinator", "watcher", "registry"):
            b.plot(xs, [r["cpu_us_per_change"][k] for r in ours], marker="o", label=k)
    a.set_xlabel("registry entries")
    a.set_title("heartbeat p99 (ms) and registration rate")
    a.legend(fontsize=7)
    b.set_xlabel("registry entries")
    b.set_ylabel("CPU µs per change")
    b.set_ylim(bottom=0)
    b.set_title("CPU per change (flat = cost of the change, not the fleet)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def targets(rows: list[dict]) -> dict:
    top = max(r["entries"] for r in rows)
    ours = next(r for r in rows if r["contender"] == "embedded" and r["entries"] == top)
    theirs = next((r for r in rows if r["contender"] == "dbgpt" and r["entries"] == top), None)
    curve = [r["cpu_us_per_change"]["coordinator"] for r in rows if r["contender"] == "embedded"]
    out = {
        "entries": top,
        "registration_per_s >= 2000": ours["register"]["rate"] >= 2000,
        "heartbeats_1000: p99 <= 25 ms, no errors": ours["heartbeat_1000"]["p99_ms"] <= 25
        and ours["heartbeat_1000"]["errors"] == 0,
        "registration visible <= 200 ms (max of samples)": ours["visible_max_ms"] <= 200,
        "coordinator cpu/change at largest / smallest": round(curve[-1] / curve[0], 2) if curve[0] else None,
    }
    if theirs:
        out["heartbeat p99 at 1000/s better than DB-GPT's"] = (
            ours["heartbeat_1000"]["p99_ms"] <= theirs["heartbeat_1000"]["p99_ms"])
        out["registration faster than DB-GPT's"] = ours["register"]["rate"] >= theirs["register"]["rate"]
    return out


async def main_async(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        async with listeners():
            task = progress.add_task("embedded registry", total=4 * len(sizes))
            rows += await bench_embedded(sizes, args.seconds, progress, task)
        if not args.no_dbgpt:
            task = progress.add_task("DB-GPT controller", total=4 * len(sizes))
            rows += await bench_dbgpt(sizes, args.seconds, progress, task)
    return {
        "date": datetime.now().isoformat(timespec="minutes"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        "load_generator": "aiohttp, keep-alive, in the benchmark process",
        "seconds_per_heartbeat_phase": args.seconds,
        "rows": rows,
        "targets": targets(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each heartbeat phase")
    parser.add_argument("--no-dbgpt", action="store_true", help="skip DB-GPT's controller")
    args = parser.parse_args()
    ray.init(namespace="bench", logging_level="WARNING", include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    started = time.monotonic()
    try:
        result = asyncio.run(main_async(args))
    finally:
        ray.shutdown()
    result["seconds"] = round(time.monotonic() - started)
    console.print(table(result["rows"]))
    console.print(cost_table(result["rows"]))
    console.print(result["targets"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2))
    plot(result["rows"], RESULTS / "scale.png")
    console.print(f"written: {RESULTS / 'scale.json'}, {RESULTS / 'scale.png'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
