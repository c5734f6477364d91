"""A driver process that holds streams open: attaches to coordinator NAME (in
the ``tests`` namespace, on RAY_ADDRESS), starts COUNT streamed generate
calls of MODEL through RayWorkerManager, prints ``streaming`` once each has
its first chunk, and reads them until killed. Run by tests/test_load_reports.py
to stand for another caller process (a gateway replica, another driver)."""

from __future__ import annotations

import asyncio
import os
import sys

import coordinator


async def main(name: str, model: str, count: int) -> None:
    manager = coordinator.RayWorkerManager(coordinator.attach(name, namespace="tests"))
    started = asyncio.Event()
    first = 0

    async def one(i: int) -> None:
        nonlocal first
        params = {"model": model, "messages": [{"role": "human", "content": f"held {i} " + "word " * 500}]}
        async for out in manager.generate_stream(params):
            if out.error_code:  # the test reads no "streaming" line, and says what it got instead
                print(f"failed: {out.text}", flush=True)
                os._exit(1)
            if i >= 0:
                first += 1
                if first == count:
                    started.set()
                i = -1

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    await started.wait()
    print("streaming", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
