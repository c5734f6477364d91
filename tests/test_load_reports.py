"""The fleet's load as the coordinator sees it: every caller's router reports
its requests in flight per instance; the coordinator sums them (status, per
instance), answers each router with what the others have in flight (what a
gateway replica adds to its own count when it chooses), and stops counting a
caller that died once its reports are ``caller.report_ttl`` old.

Real processes: a reference worker with long streams, a second driver
process holding streams open, killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest
import ray
from click.testing import CliRunner

import coordinator
from coordinator.driver.cli import cli
from coordinator.driver.router import Router
from tests.conftest import ROOT, wait_until
from tests.test_traffic import FAST, SLOW_HEARTBEATS, probed

pytestmark = pytest.mark.ray

REPORTS = {"caller": {"report_every": 0.5, "report_ttl": 2.0}}


def in_flight(cluster: coordinator.Cluster, model: str) -> int:
    return sum(r.in_flight for r in cluster.status().instances if r.model == model)


def hold_streams(manager: coordinator.RayWorkerManager, model: str, count: int, stop: threading.Event) -> threading.Thread:
    """``count`` streams of ``model`` from this process, read until ``stop``."""

    async def run() -> None:
        async def one(i: int) -> None:
            params = {"model": model, "messages": [{"role": "human", "content": f"mine {i} " + "word " * 500}]}
            async for _ in manager.generate_stream(params):
                if stop.is_set():
                    return

        await asyncio.gather(*(one(i) for i in range(count)))
        await manager.aclose()

    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    thread.start()
    return thread


def test_in_flight_is_summed_over_callers_shared_back_and_a_dead_callers_count_expires(ray_session, worker_process):
    cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST, **REPORTS}, name="load-reports",
                                namespace="tests")
    driver = None
    stop = threading.Event()
    try:
        # Streams of ~100 s (a chunk per word of the ~500-word answer): held
        # open for as long as the test needs them.
        worker = worker_process("long@llm", controller=cluster.registry_url(), heartbeat_interval=1,
                                chunks=400, chunk_delay=0.25)
        probed(cluster, "long", 1)
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        driver = subprocess.Popen([sys.executable, "-m", "tests.load_driver", "load-reports", "long", "3"],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert driver.stdout.readline().strip() == "streaming"
        wait_until(lambda: in_flight(cluster, "long") == 3, timeout=15, what="the other driver's 3 streams counted")

        manager = coordinator.RayWorkerManager(cluster)
        mine = hold_streams(manager, "long", 2, stop)
        wait_until(lambda: in_flight(cluster, "long") == 5, timeout=15, what="both callers' streams summed")
        assert cluster.status().load_reporters == 2
        table = CliRunner().invoke(cli, ["--name", "load-reports", "--namespace", "tests", "status"],
                                   terminal_width=250).output
        assert "in flight as 2 caller(s) report" in table
        assert any(line.startswith("│ long ") and "│ 5 " in line for line in table.splitlines()), table
        router = Router.acquire(cluster)  # this process's router: the one the manager reports through
        try:
            instance = ("long@llm", "127.0.0.1", worker.port)
            wait_until(lambda: router.others_in_flight() == {instance: 3}, timeout=15,
                       what="the other caller's streams shared back with this one")

            driver.kill()  # no goodbye: its count must expire on its own
            driver.wait(timeout=10)
            wait_until(lambda: in_flight(cluster, "long") == 2, timeout=10,
                       what="the dead caller's streams no longer counted")
            wait_until(lambda: router.others_in_flight() == {}, timeout=10, what="nothing left elsewhere")
            stop.set()
            mine.join(timeout=30)
            wait_until(lambda: in_flight(cluster, "long") == 0, timeout=10, what="this caller's streams ended")
            # Idle (and still held here), this process's router goes on saying
            # which table it applied — a drain waits for every router it knows:
            # it never falls out of the book while it lives.
            deadline = time.monotonic() + 2 * REPORTS["caller"]["report_ttl"]
            while time.monotonic() < deadline:
                assert cluster.status().load_reporters == 1
                time.sleep(0.5)
        finally:
            router.release()
        # Released by everything in this process: it says goodbye and counts for nothing.
        wait_until(lambda: cluster.status().load_reporters == 0, timeout=10, what="the goodbye taken")
    finally:
        stop.set()
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.stop(forget=True)


def test_report_settings_that_would_expire_a_live_caller_are_refused():
    with pytest.raises(ValueError, match="report_ttl"):
        coordinator.CoordinatorConfig.model_validate({"caller": {"report_every": 2, "report_ttl": 3}})
