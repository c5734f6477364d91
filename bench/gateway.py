"""The gateway beside DB-GPT 0.8.2's API server: routing by cache and load.

One fleet, one run: four reference worker managers on loopback with the
cost-model engine (8 request slots each; a prefix cache with a capacity in
tokens; 0.25 ms of prefill per uncached prompt token — a cold 4,000-token
prompt costs 1 s, a cached one ~20 ms; 10 ms per streamed chunk, 8 chunks),
registered with a standalone embedded registry. Contenders, each fed the same
open-loop Poisson load of streamed chats through OpenAI's API:

- DB-GPT 0.8.2's own API server (``dbgpt start apiserver``) reading that
  registry: it picks an instance with ``random.choice``;
- the gateway of a coordinator routing with ``power_of_two`` (load only);
- the gateway of a coordinator routing with ``cache_aware`` (prefix and load,
  with the hot-spot guard).

The workers are restarted (same ports) before each contender so every one
starts with cold caches.

Loads:
1. **shared prefixes**: 16 tenants, each with its own 4,000-token system
   prompt, chosen uniformly; each worker caches 4 tenants' worth (the fleet
   holds every tenant only if they are spread) — then 3 tenants' worth (the
   fleet holds 75 % of the demand, as in llm-d's published run);
2. **Zipf**: the same with one tenant taking ~47 % of the requests: the
   spread of requests in flight between workers (sampled from their
   ``/metrics``), and TTFT.

Figures: TTFT p50/p90/p99 (time to the first content token, seen by the
client), completed/s, the workers' prefix-cache hit rate, errors.

3. **The gateway's own cost**: added time to first token over calling a
   worker directly (sequential streams, p50 and p90), and the requests/s
   ceiling of one gateway replica beside DB-GPT's API server (closed loop,
   non-streamed, workers that answer at once). Beside the project's gateway
   (a Ray actor serving ``GatewayApp`` with uvicorn) runs a Ray Serve
   contender: the same ``GatewayApp``, reaching the fleet the same way, as a
   Serve deployment (one replica) behind Serve's HTTP proxy (``--no-serve``
   leaves it out; so does a Ray without Serve, saying why).

The load generator is aiohttp (about 0.45 ms of client CPU per request here),
in this process; everything shares the machine's 2 cores.

    python -m bench.gateway [--seconds 30] [--rate 18]      # or: make gateway
    python -m bench.gateway --only-cost [--streams 300] [--cost-seconds 10]

Writes bench/results/gateway.json and bench/results/gateway.png; with
``--only-cost`` (phase 3 alone: no cost-model fleet, no DB-GPT)
bench/results/gateway-cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

import coordinator  # noqa: E402
from bench.detection import spawn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
console = Console()

TENANTS = 16
PROMPT_TOKENS = 4000  # characters / 4
WORKERS = 4
ENGINE = ["--slots", "8", "--prefill-ms-per-token", "0.25", "--decode-ms-per-chunk", "10", "--block-chars", "64"]
CHUNKS = 8
#: What results holds besides the routing loads: phase 3 (the gateway's own cost).
COST = ("overhead", "ceiling", "serve")


def tenant_prompt(t: int) -> str:
    rng = random.Random(t)
    words = ["fleet", "model", "worker", "cache", "tenant", "query", "table", "report", "metric", "schema"]
    text = f"Tenant {t} system prompt. " + " ".join(rng.choice(words) for _ in range(PROMPT_TOKENS))
    return text[: PROMPT_TOKENS * 4]


class Fleet:
    """The engine workers, restartable on their ports with empty caches."""

    def __init__(self, registry: str, cache_tokens: int) -> None:
        self.registry, self.cache_tokens = registry, cache_tokens
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        for _ in range(WORKERS):
            proc, port = self._spawn(0)
            self.procs.append(proc)
            self.ports.append(port)

    def _spawn(self, port: int) -> tuple[subprocess.Popen, int]:
        return spawn(["reference_worker", "--port", str(port), "--controller", self.registry, "--model", "chat@llm",
                      "--heartbeat-interval", "1", "--chunks", str(CHUNKS), *ENGINE,
                      "--cache-tokens", str(self.cache_tokens)])

    def restart(self, cache_tokens: int) -> None:
        self.cache_tokens = cache_tokens
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait()
        for i, port in enumerate(self.ports):
            for attempt in range(50):  # the port is free once the old process is gone
                try:
                    self.procs[i] = self._spawn(port)[0]
                    break
                except RuntimeError:
                    time.sleep(0.1)

    def hit_rate(self) -> float:
        hits = queries = 0.0
        for port in self.ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            hits += sum(float(v) for v in re.findall(r'^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)', text, re.M))
            queries += sum(float(v) for v in re.findall(r'^vllm:prefix_cache_queries_total\{[^}]*\} (\S+)', text,
                                                        re.M))
        return hits / queries if queries else 0.0

    def in_flight(self) -> list[float]:
        out = []
        for port in self.ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            n = sum(float(v) for v in re.findall(r'^vllm:num_requests_(?:running|waiting)\{[^}]*\} (\S+)', text,
                                                 re.M))
            out.append(n)
        return out

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


async def poisson(url: str, rate: float, seconds: float, weights: list[float], fleet: Fleet, label: str,
                  progress: Progress) -> dict:
    """Open loop: streamed chats at ``rate``/s for ``seconds``, tenants drawn by
    ``weights``; TTFT from the moment each request was due."""
    rng = random.Random(7)
    prompts = [tenant_prompt(t) for t in range(TENANTS)]
    ttfts: list[float] = []
    errors: list[str] = []
    done = 0
    samples: list[list[float]] = []
    bar = progress.add_task(label, total=int(rate * seconds))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(due: float, tenant: int, n: int) -> None:
            nonlocal done
            body = {"model": "chat", "stream": True, "max_tokens": 64,
                    "messages": [{"role": "system", "content": prompts[tenant]},
                                 {"role": "user", "content": f"question {n}"}]}
            first = None
            try:
                async with session.post(url, json=body, headers={"Authorization": "Bearer bench"}) as resp:
                    if resp.status != 200:
                        errors.append(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                        return
                    async for line in resp.content:
                        if first is None and line.startswith(b"data: {") and b'"content":"' in line \
                                and b'"content":""' not in line:
                            first = time.monotonic()
                        if b'"error"' in line[:20]:
                            errors.append(line.decode()[:200])
                            return
                if first is None:
                    errors.append("no content")
                    return
                ttfts.append(first - due)
                done += 1
            except Exception as exc:  # noqa: BLE001 - each failure is counted
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                progress.advance(bar)

        async def sampler() -> None:
            while True:
                await asyncio.sleep(0.5)
                samples.append(await asyncio.to_thread(fleet.in_flight))

        sampling = asyncio.create_task(sampler())
        tasks = []
        start = time.monotonic()
        due = start
        n = 0
        while due - start < seconds:
            due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tenant = rng.choices(range(TENANTS), weights=weights)[0]
            tasks.append(asyncio.create_task(one(due, tenant, n)))
            n += 1
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
        sampling.cancel()
    q = statistics.quantiles(ttfts, n=100) if len(ttfts) >= 2 else [float("nan")] * 99
    means = [statistics.fmean(col) for col in zip(*samples)] if samples else []
    return {
        "sent": n, "completed": done, "completed_per_s": round(done / elapsed, 2), "errors": len(errors),
        "first_errors": errors[:3],
        "ttft_p50_ms": round(q[49] * 1000, 1), "ttft_p90_ms": round(q[89] * 1000, 1),
        "ttft_p99_ms": round(q[98] * 1000, 1), "hit_rate": round(fleet.hit_rate(), 3),
        "in_flight_mean_per_worker": [round(m, 2) for m in means],
        "in_flight_max_over_min": round(max(means) / min(means), 2) if means and min(means) > 0 else None,
    }


def wait_routes(cluster: coordinator.Cluster, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = [r for r in cluster.status().instances if r.model == "chat" and r.registry_healthy and r.reachable]
        if len(rows) >= count:
            time.sleep(2.0)  # the gateway's own copy of the route table follows by long poll
            return
        time.sleep(0.2)
    raise RuntimeError(f"{cluster.name}: {count} chat instances not routable within 60 s")


async def overhead(direct_port: int, gateways: dict[str, str], streams: int, warmup: int = 10,
                   passthroughs: dict[str, str] | None = None) -> dict:
    """Sequential streams, time to first content: straight to the worker
    (DB-GPT's protocol), through each bare pass-through (the same body, see
    bench/passthrough.py) and through each gateway (OpenAI), one of each in
    turn so that whatever else the machine does weighs on all alike; the first
    ``warmup`` rounds (connections, route tables) not counted."""
    body_oa = {"model": "fast", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    body_db = {"model": "fast", "messages": [{"role": "human", "content": "hi"}]}
    targets = {"direct": (f"http://127.0.0.1:{direct_port}/api/worker/generate_stream", body_db)}
    targets |= {name: (f"{base}/api/worker/generate_stream", body_db) for name, base in (passthroughs or {}).items()}
    targets |= {name: (f"{base}/v1/chat/completions", body_oa) for name, base in gateways.items()}
    times: dict[str, list[float]] = {name: [] for name in targets}
    async with aiohttp.ClientSession() as session:
        for n in range(warmup + streams):
            for name, (url, body) in targets.items():
                t0 = time.monotonic()
                async with session.post(url, json=body) as resp:
                    async for chunk in resp.content.iter_any():
                        if chunk:
                            if n >= warmup:
                                times[name].append(time.monotonic() - t0)
                            break
                    await resp.read()
    out: dict[str, dict[str, float]] = {}
    for name, xs in times.items():
        out[name] = {"p50_ms": round(statistics.median(xs) * 1000, 3),
                     "p90_ms": round(statistics.quantiles(xs, n=10)[8] * 1000, 3)}
    for name in [*(passthroughs or {}), *gateways]:
        for q in ("p50", "p90"):
            out[name][f"added_{q}_ms"] = round(out[name][f"{q}_ms"] - out["direct"][f"{q}_ms"], 3)
    return out


async def ceiling(url: str, concurrency: int, seconds: float) -> float:
    """Closed loop, non-streamed chats: completed requests per second (other
    answers are not counted, and said)."""
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
    done = 0
    failed: Counter[int] = Counter()
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def caller() -> None:
            nonlocal done
            while time.monotonic() < end:
                async with session.post(url, json=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1
                    else:
                        failed[resp.status] += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    if failed:
        console.print(f"[yellow]{url}: answers other than 200 (not counted): {dict(failed)}")
    return round(done / seconds, 1)


def serve_missing(args: argparse.Namespace) -> str | None:
    """Why the Ray Serve contender is left out, or None."""
    if args.no_serve:
        return "--no-serve"
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        return f"Ray Serve cannot be imported ({exc}): pip install 'ray[serve]' (the bench extra)"
    return None


def serve_gateway(cluster: coordinator.Cluster, port: int) -> str:
    """The Ray Serve contender: the same :class:`GatewayApp`, reaching the fleet
    the same way (:func:`fleet_manager`) with the same settings as the
    coordinator's gateway, as a Serve deployment of one replica behind Serve's
    HTTP proxy on ``port``; its base URL once it serves.

    Configured as the gateway is: no access log and warnings only, no cap on
    requests held but ``gateway.max_in_flight`` (Serve's default
    ``max_ongoing_requests`` of 5 would queue a closed loop of 32 at the
    proxy), no CPU reserved. Otherwise Serve's defaults: its Python proxy,
    user code on its own thread in the replica."""
    import logging

    from ray import serve

    from coordinator.core.naming import gateway_actor
    from coordinator.driver.gateway import GatewayApp, fleet_manager
    from coordinator.plumbing.metrics import GatewayMetrics

    settings = ray.get(ray.get_actor(gateway_actor(cluster.name, 0), namespace=cluster.namespace)
                       .get_settings.remote())
    logging_config = {"enable_access_log": False, "log_level": "WARNING"}
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this driver's own Serve client

    @serve.deployment(num_replicas=1, max_ongoing_requests=settings.max_in_flight,
                      ray_actor_options={"num_cpus": 0}, logging_config=logging_config)
    @serve.ingress()  # the app is built at replica start, by __serve_build_asgi_app__
    class ServeGateway:
        def __init__(self, name: str, namespace: str) -> None:
            self._where = (name, namespace)
            self._manager = None

        async def __serve_build_asgi_app__(self) -> GatewayApp:
            self._manager = await fleet_manager(*self._where)
            return GatewayApp(self._manager, settings, GatewayMetrics(0))

        async def __del__(self) -> None:
            if self._manager is not None:
                await self._manager.aclose()

    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
    serve.run(ServeGateway.bind(cluster.name, cluster.namespace), name="gateway", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of load per contender and load")
    parser.add_argument("--rate", type=float, default=8.0,
                        help="requests/s: about 60 %% of what DB-GPT's API server (random routing) sustains here "
                             "(it completes ~13/s, its own CPU the limit)")
    parser.add_argument("--only-cost", action="store_true",
                        help="phase 3 alone (direct, the gateway, the gateway on Ray Serve): no cost-model fleet, "
                             "no DB-GPT; writes bench/results/gateway-cost.json")
    parser.add_argument("--no-serve", action="store_true", help="leave phase 3's Ray Serve contender out")
    parser.add_argument("--streams", type=int, default=300, help="phase 3: sequential streams per contender")
    parser.add_argument("--cost-seconds", type=float, default=10.0,
                        help="phase 3: seconds of closed loop per contender for the ceiling")
    args = parser.parse_args()
    from tests.conftest import free_port
    from tests.dbgpt_env import ensure_venv, start_apiserver

    no_serve = serve_missing(args)
    if no_serve:
        console.print(f"[yellow]The Ray Serve contender is left out: {no_serve}")
    bin_dir = None if args.only_cost else ensure_venv()
    ray.init(namespace="bench-gateway", include_dashboard=False, logging_level="ERROR")
    registry_proc, registry_port = spawn(["actors.registry", "--port", "0", "--heartbeat-interval", "1",
                                          "--heartbeat-timeout", "30"])
    registry = f"http://127.0.0.1:{registry_port}"
    source = {"kind": "dbgpt", "name": "fleet", "url": registry, "poll_interval": 0.5}
    caches = {"4 tenants per worker": 4 * PROMPT_TOKENS + 1000, "3 tenants per worker": 3 * PROMPT_TOKENS + 1000}
    fleet = None if args.only_cost else Fleet(registry, caches["4 tenants per worker"])
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    clusters: dict[str, coordinator.Cluster] = {}
    extra = []
    results: dict = {}
    serving = False

    def coordinators(cache_tokens: int,
                     policies: tuple[str, ...] = ("power_of_two", "cache_aware")) -> dict[str, str]:
        """The gateways' coordinators, (re)started: the cache-aware index is
        told the workers' cache size (in its blocks), as an operator would."""
        for c in clusters.values():
            c.stop(forget=True)
        for policy in policies:
            clusters[policy] = coordinator.start(
                {"registries": [source], "long_poll_timeout": 2,
                 "routing": {"policy": policy, "block_chars": 64, "capacity_blocks": cache_tokens * 4 // 64}},
                name=f"bench-{policy}", namespace="bench-gateway")
        return {policy: c.serve(port=0) for policy, c in clusters.items()}

    try:
        if args.only_cost:
            api = None
            coordinators(caches["4 tenants per worker"], ("cache_aware",))
        else:
            api = start_apiserver(bin_dir, free_port(), registry, workdir)
            extra.append(api)
        zipf = [1 / (k + 1) ** 1.5 for k in range(TENANTS)]
        loads = {} if args.only_cost else {
            "shared prefixes, fleet caches all (4/worker)": (caches["4 tenants per worker"], [1.0] * TENANTS),
            "shared prefixes, fleet caches 75 % (3/worker)": (caches["3 tenants per worker"], [1.0] * TENANTS),
            f"Zipf, top tenant {zipf[0] / sum(zipf):.0%} (4/worker)": (caches["4 tenants per worker"], zipf),
        }
        with Progress(console=console) as progress:
            for load, (cache, weights) in loads.items():
                gateways = coordinators(cache)
                contenders = {
                    "DB-GPT 0.8.2 API server (random)": f"{api.url}/api/v1/chat/completions",
                    "gateway, power_of_two": f"{gateways['power_of_two']}/v1/chat/completions",
                    "gateway, cache_aware": f"{gateways['cache_aware']}/v1/chat/completions",
                }
                results[load] = {}
                for name, url in contenders.items():
                    fleet.restart(cache)
                    for c in clusters.values():
                        wait_routes(c, WORKERS)
                    results[load][name] = asyncio.run(
                        poisson(url, args.rate, args.seconds, weights, fleet, f"{load[:28]} / {name[:24]}", progress))
                for policy in clusters:
                    actor = ray.get_actor(f"bench-{policy}/gateway/0", namespace="bench-gateway")
                    results[load][f"gateway, {policy}"]["decisions"] = ray.get(actor.stats.remote()).get("reasons", {})
        # The gateway's own cost: fast workers (no engine, answer at once).
        fast = [spawn(["reference_worker", "--controller", registry, "--model", "fast@llm",
                       "--heartbeat-interval", "1", "--chunks", "4"]) for _ in range(2)]
        extra += [p for p, _ in fast]
        gateways = {"gateway": clusters["cache_aware"].serve(port=0)}
        wait = time.monotonic() + 60
        while time.monotonic() < wait and len(clusters["cache_aware"].instances("fast")) < 2:
            time.sleep(0.2)
        if no_serve is None:
            started = time.monotonic()
            serving = True
            gateways["gateway on Ray Serve"] = serve_gateway(clusters["cache_aware"], free_port())
            results["serve"] = {"ray": ray.__version__, "startup_s": round(time.monotonic() - started, 1),
                                "api": "serve.deployment + serve.ingress() (__serve_build_asgi_app__), "
                                       "Serve's HTTP proxy"}
        else:
            results["serve"] = {"left_out": no_serve}
        passthroughs = {}
        for loop in ("asyncio", "uvloop"):
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "bench.passthrough", "--port", str(port),
                                     "--worker-port", str(fast[0][1]), "--loop", loop], cwd=ROOT)
            extra.append(proc)
            passthroughs[f"bare pass-through ({loop})"] = f"http://127.0.0.1:{port}"
        time.sleep(3)
        results["overhead"] = asyncio.run(overhead(fast[0][1], gateways, args.streams, passthroughs=passthroughs))
        results["ceiling"] = {f"{name} (1 replica)": asyncio.run(ceiling(f"{url}/v1/chat/completions", 32,
                                                                         args.cost_seconds))
                              for name, url in gateways.items()}
        if api is not None:
            results["ceiling"]["DB-GPT 0.8.2 API server"] = asyncio.run(
                ceiling(f"{api.url}/api/v1/chat/completions", 32, args.cost_seconds))
    finally:
        if serving:
            from ray import serve

            serve.shutdown()
        for p in extra:
            p.kill()
        if fleet is not None:
            fleet.stop()
        for c in clusters.values():
            c.stop(forget=True)
        registry_proc.kill()
        ray.shutdown()

    _report(results, args)


def _report(results: dict, args: argparse.Namespace) -> None:
    for load, rows in results.items():
        if load in COST:
            continue
        table = Table(title=f"{load}: {args.rate:g} req/s Poisson, {args.seconds:g} s, streamed chats")
        for col in ("contender", "TTFT p50 ms", "p90 ms", "p99 ms", "completed/s", "hit rate", "errors",
                    "in flight max/min"):
            table.add_column(col)
        for name, r in rows.items():
            table.add_row(name, str(r["ttft_p50_ms"]), str(r["ttft_p90_ms"]), str(r["ttft_p99_ms"]),
                          str(r["completed_per_s"]), f"{r['hit_rate']:.0%}", str(r["errors"]),
                          str(r["in_flight_max_over_min"]))
        console.print(table)
    for load, rows in results.items():
        for name, r in rows.items() if isinstance(rows, dict) else ():
            if isinstance(r, dict) and "decisions" in r:
                console.print(f"{load} / {name}: routing decisions {r['decisions']}")
    o, c, sv = results["overhead"], results["ceiling"], results["serve"]
    table = Table(title=f"the gateway's own cost: {args.streams} sequential streams each (taken in turn), "
                        f"a closed loop of 32 callers for {args.cost_seconds:g} s each (non-streamed)")
    for col in ("contender", "first token p50 ms", "p90 ms", "added p50 ms", "added p90 ms", "ceiling req/s"):
        table.add_column(col)
    for name, r in o.items():
        table.add_row(name, str(r["p50_ms"]), str(r["p90_ms"]), str(r.get("added_p50_ms", "")),
                      str(r.get("added_p90_ms", "")), str(c.get(f"{name} (1 replica)", "")))
    if "DB-GPT 0.8.2 API server" in c:
        table.add_row("DB-GPT 0.8.2 API server", "", "", "", "", str(c["DB-GPT 0.8.2 API server"]))
    console.print(table)
    if "left_out" in sv:
        console.print(f"Ray Serve contender left out: {sv['left_out']}")
    else:
        console.print(f"Ray Serve {sv['ray']}: {sv['api']}; serve.start + serve.run took {sv['startup_s']} s")
    ratio = None
    if c.get("DB-GPT 0.8.2 API server"):
        ratio = round(c["gateway (1 replica)"] / c["DB-GPT 0.8.2 API server"], 1)
        console.print(f"ceiling: the gateway {ratio}x DB-GPT's API server")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("gateway-cost.json" if args.only_cost else "gateway.json")).write_text(json.dumps({
        "date": datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(), "cpus": os.cpu_count(),
        "rate": args.rate, "seconds": args.seconds, "streams": args.streams, "cost_seconds": args.cost_seconds,
        "results": results, "ceiling_ratio": ratio, "load_generator": "aiohttp (in-process)",
    }, indent=2) + "\n")
    if not args.only_cost:
        _plot(results)


def _plot(results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    loads = [k for k in results if k not in COST]
    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4), sharey=True)
    for ax, load in zip(axes, loads):
        rows = results[load]
        names = list(rows)
        x = range(len(names))
        for offset, q, colour in ((-0.25, "ttft_p50_ms", "#4c72b0"), (0, "ttft_p90_ms", "#dd8452"),
                                  (0.25, "ttft_p99_ms", "#c44e52")):
            ax.bar([i + offset for i in x], [rows[n][q] for n in names], width=0.25, color=colour,
                   label=q.split("_")[1])
        ax.set_xticks(list(x), [n.replace(" (random)", "\n(random)").replace("gateway, ", "gateway\n")
                                 for n in names], fontsize=8)
        ax.set_title(load, fontsize=9)
        ax.set_yscale("log")
    axes[0].set_ylabel("time to first token (ms, log)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "gateway.png", dpi=110)


if __name__ == "__main__":
    main()
