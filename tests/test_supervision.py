"""A coordinator whose background loops fail keeps doing its job: each loop is
restarted by the supervisor, counted, and shown in ``status()``; the live set
keeps following and deployments keep healing. In-process links, no Ray."""

from __future__ import annotations

import asyncio
import json

import pytest

from actors.registry_state import MemoryStateStore

from coordinator.core.config import CoordinatorConfig
from coordinator.core.deployments import Deployment
from coordinator.control.service import CoordinatorService
from tests.test_service import FakeProxies, FakeWatchers, inst

pytestmark = pytest.mark.anyio


class CountingMetrics:
    def __init__(self) -> None:
        self.restarts: list[str] = []

    def loop_restart(self, loop: str) -> None:
        self.restarts.append(loop)

    def __getattr__(self, name):  # every other metric: ignored
        return lambda *args, **kwargs: None


async def until(condition, timeout: float = 10.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def fail_once(obj, name: str, error: Exception) -> list[int]:
    """Make ``obj.name`` raise ``error`` the next time it is called (once)."""
    real, calls = getattr(obj, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    setattr(obj, name, wrapper)
    return calls


def startups(proxies: FakeProxies) -> list[int]:
    return [ep.port for ep, method, _ in proxies.calls if method == "startup"]


async def test_loops_that_raise_are_restarted_and_the_coordinator_keeps_following_and_healing():
    config = CoordinatorConfig.model_validate({
        "registries": [{"kind": "static", "name": "a", "instances": []}],
        "long_poll_timeout": 0.2, "resync_interval": 0.1, "probe": {"enabled": False},
        "reconcile": {"resync_interval": 0.2},
    })
    watchers, proxies, metrics, store = FakeWatchers(), FakeProxies(), CountingMetrics(), MemoryStateStore()
    svc = CoordinatorService(config, watchers, proxies, metrics=metrics, store=store)

    def kept_intents() -> dict:
        return json.loads(store.data["deployments//"])["d@llm"]["intents"]

    run = asyncio.create_task(svc.run())
    managers = [inst("WorkerManager@service", 1), inst("WorkerManager@service", 2)]
    try:
        watchers.publish("a", *managers)
        await svc.wait_for("WorkerManager", 2, worker_type="service", timeout=5)

        # The gauges loop raises: before supervision this cancelled every loop.
        fail_once(svc.view, "record_gauges", RuntimeError("gauges broke"))
        await until(lambda: "gauges" in metrics.restarts, what="the gauges loop restarted")
        watchers.publish("a", *managers, inst("m@llm", 7))
        await svc.wait_for("m", 1, timeout=5)  # still following

        # The resync raises.
        fail_once(svc.view, "repair", RuntimeError("resync broke"))
        await until(lambda: "resync" in metrics.restarts, what="the resync loop restarted")
        watchers.publish("a", *managers, inst("m@llm", 7), inst("m@llm", 8))
        await svc.wait_for("m", 2, timeout=5)

        # The keeper raises mid-run: the deployment still heals afterwards.
        fail_once(svc.keeper, "_next_wake", RuntimeError("keeper broke"))
        await until(lambda: "deployments" in metrics.restarts, what="the keeper loop restarted")
        await svc.deploy([Deployment(model="d", replicas=1)])
        await until(lambda: startups(proxies), what="the deployment's first start")
        first = startups(proxies)[0]
        watchers.publish("a", *managers, inst("d@llm", first))
        await until(lambda: svc.keeper.status("d@llm").state == "ready", what="deployment ready")
        await until(lambda: not kept_intents(), what="a round saw the start done")
        watchers.publish("a", *managers)  # its instance is gone: a new start follows
        await until(lambda: len(startups(proxies)) >= 2, what="the deployment healed")

        status = await svc.status()
        loops = {s.name: s for s in status.loops}
        assert {"gauges", "resync", "deployments", "follow a"} <= set(loops)
        assert loops["gauges"].restarts == 1 and loops["gauges"].last_error == "RuntimeError: gauges broke"
        assert loops["resync"].restarts == 1 and loops["deployments"].restarts == 1
        assert all(s.state == "running" for s in status.loops)
    finally:
        run.cancel()
