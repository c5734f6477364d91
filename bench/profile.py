"""Where the coordinator's dispatch time goes: py-spy records the coordinator
actor and one proxy while a driver keeps applies to N instances in flight, then
prints the functions that take the most time (own and inclusive).

    python -m bench.profile [--instances 32] [--seconds 10]

Writes bench/results/profile.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import ray

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings

RESULTS = Path(__file__).resolve().parent / "results"


#: Leaf frames of threads that are waiting, not working (Ray's core-worker
#: loop, its GC thread, thread pools, the selector).
IDLE = ("Worker.main_loop", "Condition.wait", "Event.wait", "Thread.run", "_worker", "select",
        "EpollSelector.select")


def summarise(raw: Path, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [f.split(" (")[0] + " (" + f.split("/")[-1] if "(" in f else f for f in stack.split(";")]
        if frames[-1].startswith(IDLE):
            idle += n
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    total = max(total, 1)
    lines = [f"busy samples: {total} ({total / (total + idle):.0%} of all; the rest waiting)", "own time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines += ["inclusive time (frames under the event loop):"]
    skip = ("<module>", "run (", "Runner.", "BaseEventLoop.run", "main (", "_run_code", "_run_module", "Handle._run")
    kept = [(f, n) for f, n in inclusive.most_common() if not f.startswith(skip)]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in kept[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    py_spy = Path(os.environ.get("VIRTUAL_ENV", Path(__import__("sys").executable).parent.parent)) / "bin" / "py-spy"
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(namespace="bench", include_dashboard=False, logging_level="WARNING")
    cluster = coordinator.start({"registries": [{"kind": "embedded", "port": 0}]}, name="profile", namespace="bench")
    hosts = [ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote() for _ in range(4)]
    try:
        url = cluster.registry_url()
        ports = ray.get([hosts[i % 4].add.remote(WorkerSettings(controller=url, models=[SimModel(name="p")]))
                         for i in range(args.instances)])
        for i, port in enumerate(ports):
            ray.get(hosts[i % 4].set_faults.remote(port, latency=args.latency))
        cluster.wait_for("p", count=args.instances, timeout=300)
        cluster.apply("p", "start")
        coord = ray.get_actor("profile", namespace="bench")
        coord_pid = ray.get(coord.process_info.remote())["pid"]
        proxy = ray.get(coord.proxy_handle.remote("127.0.0.1", ports[0]))
        proxy_pid = ray.get(proxy.process_info.remote())["pid"]
        RESULTS.mkdir(parents=True, exist_ok=True)
        spies = {
            name: subprocess.Popen([str(py_spy), "record", "-d", str(int(args.seconds)), "-r", "250", "-f", "raw",
                                    "-o", str(RESULTS / f"profile-{name}.raw"), "-p", str(pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in (("coordinator", coord_pid), ("proxy", proxy_pid))
        }
        done = 0

        async def drive() -> None:
            nonlocal done
            stop = time.monotonic() + args.seconds

            async def caller():
                nonlocal done
                while time.monotonic() < stop:
                    await cluster.aio.apply("p", "start")
                    done += 1

            await asyncio.gather(*(caller() for _ in range(args.in_flight)))

        asyncio.run(drive())
        for spy in spies.values():
            spy.wait()
    finally:
        ray.get([h.stop_all.remote() for h in hosts])
        cluster.stop()
        ray.shutdown()
    report = [f"{done} applies to {args.instances} instances in {args.seconds:g} s, {args.in_flight} in flight"]
    for name in ("coordinator", "proxy"):
        report += ["", f"== {name} ==", summarise(RESULTS / f"profile-{name}.raw", args.top)]
    text = "\n".join(report)
    (RESULTS / "profile.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
