"""Where the gateway's own time goes on one streamed chat: cProfile of the
gateway's event loop, serving :class:`GatewayApp` in this process (with the
metrics the gateway actor records), while a separate client process streams
chats through it one after another.

    python -m bench.gateway_profile [--streams 2000] [--loop asyncio|uvloop] [--top 40]

Prints the functions by own time and by cumulative time, per request.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import textwrap
import time

os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray  # noqa: E402

import coordinator  # noqa: E402
from actors.serving import HttpServer  # noqa: E402
from bench.detection import spawn  # noqa: E402
from coordinator.core.config import GatewaySettings  # noqa: E402
from coordinator.driver.gateway import GatewayApp, fleet_manager  # noqa: E402
from coordinator.plumbing.metrics import GatewayMetrics  # noqa: E402

CLIENT = textwrap.dedent("""
    import asyncio, sys, time, aiohttp
    async def main(url, n):
        body = {"model": "fast", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as s:
            for _ in range(n):
                async with s.post(url, json=body) as r:
                    await r.read()
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


async def serve_and_profile(name: str, namespace: str, streams: int) -> pstats.Stats:
    manager = await fleet_manager(name, namespace)
    app = GatewayApp(manager, GatewaySettings(port=0), GatewayMetrics(0))
    server = HttpServer(app, "127.0.0.1", 0)
    port = await server.start()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    warm = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, url, "50")
    await warm.wait()
    profile = cProfile.Profile()
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, url, str(streams))
    started = time.monotonic()
    profile.enable()
    await client.wait()
    profile.disable()
    print(f"{streams} streams in {time.monotonic() - started:.1f} s")
    await server.stop()
    await manager.aclose()
    return pstats.Stats(profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cluster = coordinator.start({"registries": [{"kind": "embedded", "name": "reg", "port": 0}]},
                                name="profile", namespace="bench-profile")
    workers = []
    try:
        url = cluster.registry_url()
        workers = [spawn(["reference_worker", "--controller", url, "--model", "fast@llm",
                          "--heartbeat-interval", "1", "--chunks", "4"])[0] for _ in range(2)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(cluster.instances("fast")) < 2:
            time.sleep(0.2)
        if args.loop == "uvloop":
            import uvloop

            stats = uvloop.run(serve_and_profile(cluster.name, cluster.namespace, args.streams))
        else:
            stats = asyncio.run(serve_and_profile(cluster.name, cluster.namespace, args.streams))
    finally:
        for w in workers:
            w.kill()
        cluster.stop(forget=True)
        ray.shutdown()
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        stats.stream = out
        stats.sort_stats(key).print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
