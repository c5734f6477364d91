"""``deploy(wait=True)`` answers as soon as waiting cannot help or is over:
a deployment no eligible manager can take fails at once with the reason, and
one that needs no action returns at once. In-process links, no Ray."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.control.service import CoordinatorService
from coordinator.core.config import CoordinatorConfig
from coordinator.core.deployments import Deployment
from coordinator.core.errors import DeploymentNotReadyError
from tests.test_service import FakeProxies, FakeWatchers, inst

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service():
    config = CoordinatorConfig.model_validate({
        "registries": [{"kind": "static", "name": "a", "instances": []}],
        "long_poll_timeout": 0.2, "probe": {"enabled": False}, "reconcile": {"resync_interval": 60},
    })
    watchers, proxies = FakeWatchers(), FakeProxies()
    svc = CoordinatorService(config, watchers, proxies)
    run = asyncio.create_task(svc.run())
    watchers.publish("a", inst("WorkerManager@service", 1))
    await svc.wait_for("WorkerManager", 1, worker_type="service", timeout=5)
    yield svc
    run.cancel()


async def test_a_deployment_that_cannot_be_placed_fails_at_once_naming_why(service):
    started = time.monotonic()
    with pytest.raises(DeploymentNotReadyError, match="no other eligible worker manager among hosts 10.9.9.9:1"):
        await service.deploy([Deployment(model="m", replicas=1, hosts=["10.9.9.9:1"])], wait=True, timeout=30)
    assert time.monotonic() - started < 10  # not the 30 s timeout (the resync is 60 s)


async def test_a_deployment_needing_no_action_returns_at_once(service):
    started = time.monotonic()
    assert await service.deploy([Deployment(model="m", replicas=0)], wait=True, timeout=30) == [1]
    assert time.monotonic() - started < 10
