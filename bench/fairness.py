"""A noisy tenant beside quiet ones, through the gateway (issue #21, point 5,
the flow-control half): what the quiet tenants' time to first token becomes
when one tenant sends ten times their rate into a full fleet, with the
gateway's flow control and without it.

**Fleet.** Two reference worker managers serve model ``shared`` with the
cost-model engine: 16 request slots each (a batch, as an LLM server runs
many sequences at once; a 17th request waits), a prefill of 0.25 ms per
prompt token (each request's ~2,000-token prompt is its own: ~0.5 s before
its first token) and 10 chunks 0.2 s apart (~2.6 s a request). 32 at once:
the fleet serves ~12 requests a second.

**Tenants**, each its own API key, each an open-loop Poisson stream of
streamed chats: five quiet ones at 1 request/s each (together ~40 % of the
fleet), and a noisy one at 10 requests/s — ten times a quiet one's rate,
which takes the fleet to ~120 % of what it serves.

**Contenders**, one after the other, each ``--seconds`` long (after a
warm-up), on the same fleet:

- **quiet alone** — the five quiet tenants, through the gateway with flow
  control and no cap (their baseline: the whole fleet theirs);
- **noisy, flow control** — all six, through a gateway with
  ``gateway.flow``: ``capacity`` 32 (the fleet's slots), each tenant its own
  share (weight 1), waiting at most ``max_wait`` 10 s; the router holds each
  worker to its 16 slots (``caller.max_connections_per_worker``), so an
  admitted request never queues in an engine behind another tenant's. Three
  of these, by each tenant's ``max_in_flight``: none (work-conserving: the
  noisy tenant takes every place the quiet ones leave), 16 (half the fleet)
  and 8 (a quarter) — ``--caps``;
- **noisy, no flow control** — all six through a gateway without
  ``gateway.flow``: everything goes to the workers, whose engines queue it
  first come, first served.

Each contender has a coordinator and gateway of its own, watching the one
registry the workers register with.

**Figures** per contender: the quiet tenants' TTFT p50/p99 (all five
together; a request refused or failed counts as never answered, an infinite
TTFT), and against their p99 alone; requests refused (429) and failed, per kind of tenant; each
tenant's requests completed per second within the window (whenever they
arrived); **Jain's fairness index** over the six tenants of what each got
against its max-min fair share (the fleet's completions per second in the
window, water-filled over what each tenant asked in it (its arrivals in the
window, per second): a tenant asking less
than an equal share is owed all of it, the rest is split evenly) — 1.0 when
every tenant got its fair share.

Target (the issue's): the quiet tenants' p99 TTFT with the noisy tenant at
most 1.5x their p99 alone.

    python -m bench.fairness [--seconds 60]   # also run by make demand

Load generator: aiohttp, in this process (one event loop, ~15 streams a
second). Writes bench/results/fairness.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "token")

import aiohttp  # noqa: E402
import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import coordinator  # noqa: E402
from bench.detection import spawn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NAMESPACE = "bench-fairness"
MODEL = "shared"
WORKERS = 2
SLOTS = 16
CHUNKS = 10
CHUNK_DELAY = 0.2
PROMPT_TOKENS = 2000
QUIET = 5
QUIET_RATE = 1.0
NOISY_RATE = 10 * QUIET_RATE
MAX_WAIT = 10.0
#: The flow-control contenders: each tenant's ``max_in_flight`` (0: no cap).
CAPS = (0, 16, 8)
WARMUP_S = 10.0
TARGET_RATIO = 1.5

console = Console()


@dataclass
class Outcome:
    tenant: str
    arrived: float
    status: int = 0  # 0: the connection failed
    ttft: float | None = None
    completed: bool = False
    ended: float | None = None


@dataclass
class Tenant:
    name: str
    key: str
    rate: float
    outcomes: list[Outcome] = field(default_factory=list)
    warmup: list[Outcome] = field(default_factory=list)

    def completed_within(self, begin: float, end: float) -> int:
        """Requests that ended complete between ``begin`` and ``end``: the
        tenant's throughput over the window, whenever they arrived."""
        return sum(o.completed and o.ended is not None and begin <= o.ended < end
                   for o in [*self.warmup, *self.outcomes])

    @property
    def quiet(self) -> bool:
        return self.name.startswith("quiet")


def prompt(rng: random.Random) -> str:
    """~PROMPT_TOKENS tokens (4 characters each) no other request shares."""
    return " ".join(f"{rng.randrange(10**6):06d}"[:3] for _ in range(PROMPT_TOKENS))


async def one(session: aiohttp.ClientSession, url: str, tenant: Tenant, text: str, out: Outcome) -> None:
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": text}]}
    headers = {"Authorization": f"Bearer {tenant.key}"}
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
            out.status = resp.status
            if resp.status != 200:
                await resp.read()
                return
            done = False
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return
                delta = event["choices"][0]["delta"] if event.get("choices") else {}
                if delta.get("content") and out.ttft is None:
                    out.ttft = time.monotonic() - out.arrived
            out.completed = done and out.ttft is not None
    except (aiohttp.ClientError, TimeoutError):
        out.status = 0
    finally:
        out.ended = time.monotonic()


async def load(url: str, tenants: list[Tenant], seconds: float) -> tuple[float, float]:
    """Every tenant's Poisson arrivals for ``seconds`` (after a warm-up whose
    requests are not kept for their times); the measured window (begin,
    end). ``Tenant.done`` gets every request's end, warm-up included, for
    the completions within the window. Each tenant's arrivals come from a
    generator seeded by its name: the same in every contender."""
    prompts = random.Random()
    begin = time.monotonic() + WARMUP_S
    end = begin + seconds
    tasks: list[asyncio.Task] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def arrivals(tenant: Tenant) -> None:
            rng = random.Random(tenant.name)
            due = time.monotonic()
            while True:
                due += rng.expovariate(tenant.rate)
                if due >= end:
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                out = Outcome(tenant.name, time.monotonic())
                (tenant.outcomes if out.arrived >= begin else tenant.warmup).append(out)
                tasks.append(asyncio.create_task(one(session, url, tenant, prompt(prompts), out)))

        await asyncio.gather(*(arrivals(t) for t in tenants))
        await asyncio.gather(*tasks)
    return begin, end


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def max_min_shares(capacity: float, demands: dict[str, float]) -> dict[str, float]:
    """Water-filling: each tenant gets its demand or an equal split of what is left, whichever is less."""
    shares: dict[str, float] = {}
    left, open_ = capacity, dict(demands)
    while open_:
        equal = left / len(open_)
        small = {t: d for t, d in open_.items() if d <= equal}
        if not small:
            shares.update({t: equal for t in open_})
            break
        for t, d in small.items():
            shares[t] = d
            left -= d
            del open_[t]
    return shares


def jain(values: list[float]) -> float | None:
    if not values or not any(values):
        return None
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def measure(tenants: list[Tenant], window: tuple[float, float]) -> dict:
    begin, end = window
    seconds = end - begin
    quiet = [o for t in tenants if t.quiet for o in t.outcomes]
    noisy = [o for t in tenants if not t.quiet for o in t.outcomes]
    # A quiet request refused or failed counts as never answered (an infinite
    # TTFT), not as left out: the percentiles are over every quiet request.
    ttfts = [o.ttft if o.completed and o.ttft is not None else math.inf for o in quiet]
    rates = {t.name: t.completed_within(begin, end) / seconds for t in tenants}
    asked = {t.name: len(t.outcomes) / seconds for t in tenants}
    return {
        "quiet_requests": len(quiet),
        "quiet_ttft_p50_s": _r(quantile(ttfts, 0.5)),
        "quiet_ttft_p99_s": _r(quantile(ttfts, 0.99)),
        "asked_per_s": {name: round(r, 2) for name, r in asked.items()},
        "quiet_refused": sum(o.status == 429 for o in quiet),
        "quiet_failed": sum(not o.completed and o.status != 429 for o in quiet),
        "noisy_requests": len(noisy),
        "noisy_ttft_p50_s": _r(quantile([o.ttft for o in noisy if o.completed and o.ttft is not None], 0.5)),
        "noisy_refused": sum(o.status == 429 for o in noisy),
        "noisy_failed": sum(not o.completed and o.status != 429 for o in noisy),
        "completed_per_s": {name: round(r, 2) for name, r in rates.items()},
    }


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or math.isinf(x) else round(x, digits)


def tenants_for(noisy: bool, keys: dict[str, str]) -> list[Tenant]:
    out = [Tenant(f"quiet-{i}", keys[f"quiet-{i}"], QUIET_RATE) for i in range(1, QUIET + 1)]
    if noisy:
        out.append(Tenant("noisy", keys["noisy"], NOISY_RATE))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="each contender's measured window")
    parser.add_argument("--caps", default=",".join(map(str, CAPS)),
                        help="flow-control contenders by each tenant's max_in_flight (0: no cap), comma-separated")
    args = parser.parse_args()
    names = [f"quiet-{i}" for i in range(1, QUIET + 1)] + ["noisy"]
    keys = {name: f"key-{name}-{random.randrange(10**9)}" for name in names}
    for name, key in keys.items():
        os.environ[f"BENCH_KEY_{name.replace('-', '_').upper()}"] = key
    os.environ["BENCH_KEYS"] = "\n".join(keys.values())
    key_list = [{"env": "BENCH_KEYS"}]
    caps = [int(c) for c in args.caps.split(",")]

    def flow(cap: int) -> dict:
        limit = {"max_in_flight": cap} if cap else {}
        tenants = [{"name": name, "keys": [{"env": f"BENCH_KEY_{name.replace('-', '_').upper()}"}], **limit}
                   for name in names]
        return {"port": 0, "api_keys": key_list,
                "flow": {"capacity": WORKERS * SLOTS, "max_wait": MAX_WAIT, "tenants": tenants}}

    started = time.monotonic()
    ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, logging_level="WARNING")
    worker_log = tempfile.NamedTemporaryFile("w", prefix="bench-fairness-workers-", suffix=".log", delete=False)
    clusters: list[coordinator.Cluster] = []
    workers: list = []
    results: dict[str, dict] = {}
    try:
        # Flow control admits the fleet's slots, and the router keeps each
        # worker to its own (caller.max_connections_per_worker): an admitted
        # request never waits in an engine's queue behind another tenant's
        # because the routers' choice was uneven.
        fleet = coordinator.start(
            {"registries": [{"kind": "embedded", "name": "fleet", "port": 0, "heartbeat_interval": 1}],
             "routing": {"policy": "power_of_two"}, "caller": {"max_connections_per_worker": SLOTS}},
            name="fleet", namespace=NAMESPACE)
        clusters.append(fleet)
        watching = {"kind": "dbgpt", "name": "fleet", "url": fleet.registry_url(), "poll_interval": 1}
        # One coordinator (and gateway) per contender, watching the one registry.
        for cap in caps[1:]:
            clusters.append(coordinator.start(
                {"registries": [watching], "routing": {"policy": "power_of_two"},
                 "caller": {"max_connections_per_worker": SLOTS}}, name=f"cap{cap}", namespace=NAMESPACE))
        clusters.append(coordinator.start({"registries": [watching], "routing": {"policy": "power_of_two"}},
                                          name="free", namespace=NAMESPACE))
        command = ["reference_worker", "--controller", fleet.registry_url(), "--heartbeat-interval", "1",
                   "--model", f"{MODEL}@llm", "--slots", str(SLOTS), "--chunks", str(CHUNKS),
                   "--chunk-delay", str(CHUNK_DELAY), "--prefill-ms-per-token", "0.25"]
        workers = [spawn(command, stderr=worker_log) for _ in range(WORKERS)]
        for c in clusters:
            c.wait_for(MODEL, count=WORKERS, timeout=60)
        urls = {cap: c.serve(settings=flow(cap)) for cap, c in zip(caps, clusters)}
        urls["free"] = clusters[-1].serve(settings={"port": 0, "api_keys": key_list})
        plan = [("quiet alone", caps[0], False),
                *((f"noisy, flow control{f', {cap} per tenant' if cap else ''}", cap, True) for cap in caps),
                ("noisy, no flow control", "free", True)]
        for name, gateway, noisy in plan:
            console.print(f"{name} ({args.seconds:g} s after a {WARMUP_S:g} s warm-up)…")
            tenants = tenants_for(noisy, keys)
            window = asyncio.run(load(urls[gateway], tenants, args.seconds))
            results[name] = measure(tenants, window)
            time.sleep(5)  # the fleet empties
    finally:
        for c in clusters:
            c.stop(forget=True)
        for proc, _ in workers:
            proc.terminate()
            proc.wait(timeout=10)
        ray.shutdown()
        console.print(f"worker logs: {worker_log.name}")
    report(results, args, time.monotonic() - started)


def fairness(results: dict) -> float:
    """Each contender's fair shares and Jain's index, owed out of the fleet's
    capacity — the most completions per second any contender got from it —
    water-filled over what each tenant asked in its window (its arrivals, not
    its nominal rate): a contender that leaves the fleet idle while it
    refuses is not owed less for it. The capacity."""
    capacity = max(sum(r["completed_per_s"].values()) for r in results.values())
    for r in results.values():
        fair = max_min_shares(capacity, r["asked_per_s"])
        r["fair_share_per_s"] = {name: round(x, 2) for name, x in fair.items()}
        r["jain"] = _r(jain([r["completed_per_s"][n] / fair[n] for n in fair if fair[n] > 0]), 3)
    return round(capacity, 2)


def report(results: dict, args: argparse.Namespace, took: float) -> None:
    capacity = fairness(results)
    alone = results["quiet alone"]["quiet_ttft_p99_s"]
    table = Table(title=f"a noisy tenant at {NOISY_RATE:g}/s beside {QUIET} quiet ones at {QUIET_RATE:g}/s "
                        f"({args.seconds:g} s each)")
    for col in ("contender", "quiet TTFT p50 s", "p99 s", "p99 vs alone", "quiet refused / failed",
                "noisy refused / failed", "noisy TTFT p50 s", "Jain's index"):
        table.add_column(col)
    for name, r in results.items():
        ratio = None if not alone or r["quiet_ttft_p99_s"] is None else round(r["quiet_ttft_p99_s"] / alone, 2)
        r["quiet_p99_vs_alone"] = ratio
        noisy = "" if not r["noisy_requests"] else f"{r['noisy_refused']} / {r['noisy_failed']} of {r['noisy_requests']}"
        table.add_row(name, str(r["quiet_ttft_p50_s"]), str(r["quiet_ttft_p99_s"]), f"{ratio}x" if ratio else "",
                      f"{r['quiet_refused']} / {r['quiet_failed']} of {r['quiet_requests']}", noisy,
                      str(r["noisy_ttft_p50_s"] or ""), str(r["jain"]))
    console.print(table)
    for name, r in results.items():
        console.print(f"{name}: completed/s {r['completed_per_s']} (max-min fair {r['fair_share_per_s']})")
    console.print(f"the fleet's capacity (the most completions any contender got): {capacity}/s")
    flowed = {name: r["quiet_p99_vs_alone"] for name, r in results.items() if "flow control" in name
              and "no flow" not in name}
    met = any(x is not None and x <= TARGET_RATIO for x in flowed.values())
    console.print(f"target: quiet p99 with the noisy tenant ≤ {TARGET_RATIO}x alone — "
                  f"{'met' if met else 'missed'} ({', '.join(f'{n}: {x}x' for n, x in flowed.items())})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fairness.json").write_text(json.dumps({
        "date": datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(), "cpus": os.cpu_count(),
        "seconds": args.seconds, "took_s": round(took), "load_generator": "aiohttp (in-process)",
        "fleet": {"workers": WORKERS, "slots": SLOTS, "chunks": CHUNKS, "chunk_delay_s": CHUNK_DELAY,
                  "prompt_tokens": PROMPT_TOKENS, "prefill_ms_per_token": 0.25},
        "rates": {"quiet": QUIET_RATE, "quiet_tenants": QUIET, "noisy": NOISY_RATE},
        "capacity_per_s": capacity, "results": results, "target_met": met,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
