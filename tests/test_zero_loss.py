"""Zero-loss changes, end to end: real reference workers whose models take
``load_s`` to load and abort what is in flight when they stop (as a real
engine does), long streams through RayWorkerManager, and the coordinator's
operations — a rolling restart, a rolling update_params, a shutdown — run
under that load. With draining, no stream is lost; with the drain off
(``drain_timeout=0``), the same rollout cuts streams: the test can fail."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

import coordinator
from tests.conftest import wait_until
from tests.test_traffic import FAST, SLOW_HEARTBEATS, probed

pytestmark = pytest.mark.ray

MODEL = "z"
#: A ~30-word answer, a chunk per word 0.08 s apart: each stream lasts ~2.5 s.
PROMPT = " ".join(f"w{i}" for i in range(26))
LOAD_S = 2.0


class Load:
    """``streams`` callers streaming MODEL back to back from a thread of this
    process, each stream's outcome recorded: "ok" (ended with finish_reason
    stop), or what went wrong (an error output, or a stream that ended early)."""

    def __init__(self, cluster: coordinator.Cluster, streams: int) -> None:
        self._cluster, self._streams = cluster, streams
        self.outcomes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        manager = coordinator.RayWorkerManager(self._cluster)

        async def caller(i: int) -> None:
            while not self._stop.is_set():
                params = {"model": MODEL, "messages": [{"role": "human", "content": f"{i} {PROMPT}"}]}
                last = None
                async for last in manager.generate_stream(params):
                    if last.error_code:
                        break
                if last is None or last.error_code:
                    self.outcomes.append(f"error: {last.text if last else 'no output'}")
                elif last.finish_reason != "stop":
                    self.outcomes.append(f"truncated: {last.text[-40:]!r}")
                else:
                    self.outcomes.append("ok")

        await asyncio.gather(*(caller(i) for i in range(self._streams)))
        await manager.aclose()

    def __enter__(self) -> Load:
        self._thread.start()
        wait_until(lambda: len(self.outcomes) >= self._streams, timeout=30, what="the load running")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def lost(self) -> list[str]:
        return [o for o in self.outcomes if o != "ok"]


def aborted(ports: list[int]) -> int:
    """Requests the workers aborted because their model stopped under them."""
    return sum(1 for port in ports
               for entry in httpx.get(f"http://127.0.0.1:{port}/api/_reference/journal", timeout=10).json()
               if entry.get("aborted"))


@pytest.fixture
def fleet(ray_session, worker_process):
    cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST,
                                 "drain": {"timeout": 30}, "caller": {"report_every": 0.5, "report_ttl": 2}},
                                name="zero-loss", namespace="tests")
    try:
        workers = [worker_process(f"{MODEL}@llm", controller=cluster.registry_url(), heartbeat_interval=1,
                                  load_s=LOAD_S, chunks=30, chunk_delay=0.08) for _ in range(4)]
        probed(cluster, MODEL, 4)
        yield cluster, [w.port for w in workers]
    finally:
        cluster.stop(forget=True)


def test_rolling_operations_under_streamed_load_lose_nothing_with_draining_and_do_without(fleet):
    cluster, ports = fleet
    with Load(cluster, streams=6) as load:
        started = time.monotonic()
        result = cluster.apply(MODEL, "restart", max_unavailable=1)
        took = time.monotonic() - started
        assert result.output.success, result.output.message
        assert all("drained in" in o.message for o in result.outputs), [o.message for o in result.outputs]
        probed(cluster, MODEL, 4)
        result = cluster.apply(MODEL, "update_params", params={"temperature": 0.3}, max_unavailable=2)
        assert result.output.success, result.output.message
        probed(cluster, MODEL, 4)
        during = len(load.outcomes)
    assert load.lost() == [], load.lost()[:5]
    assert aborted(ports) == 0
    assert during > 20  # the load went on all through
    # Per batch: the drain (a stream's length at most), the load, the health gate.
    assert took < 4 * (LOAD_S + 2.5 + 3) + 10, took

    # The same rollout with the drain off cuts what is in flight.
    with Load(cluster, streams=6) as load:
        result = cluster.apply(MODEL, "restart", max_unavailable=1, drain_timeout=0)
        assert result.output.success, result.output.message
        probed(cluster, MODEL, 4)
    assert load.lost() and aborted(ports) > 0


def test_a_shutdown_under_load_drains_first(fleet):
    cluster, ports = fleet
    victim = ports[0]
    with Load(cluster, streams=4) as load:
        wait_until(lambda: any(r.in_flight for r in cluster.status().instances if r.port == victim), timeout=15,
                   what="a stream on the instance to shut down")
        out = cluster.shutdown({"host": "127.0.0.1", "port": victim, "model": MODEL, "worker_type": "llm"})
        assert out.success and "drained in" in out.message, out.message
        wait_until(lambda: len(load.outcomes) > 12, timeout=30, what="more streams after the shutdown")
    assert load.lost() == [], load.lost()[:5]
    assert aborted(ports) == 0
