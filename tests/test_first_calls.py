"""Every entry point works first: each public method of Cluster, cluster.aio and
RayWorkerManager, called as the first call on a fresh ``attach()`` in a fresh
driver process — from plain code, from inside a running event loop and from
another thread (tests/first_call_driver.py; one process per mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray

import coordinator
from tests.conftest import ROOT
from tests.first_call_driver import SKIPPED, public_methods
from tests.test_traffic import FAST, SLOW_HEARTBEATS, probed

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """A coordinator with one reference worker serving chat@llm and vec@text2vec."""
    cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST}, name="first-calls", namespace="tests")
    proc = subprocess.Popen([sys.executable, "-m", "reference_worker", "--port", "0", "--controller",
                             cluster.registry_url(), "--model", "chat@llm", "--model", "vec@text2vec",
                             "--heartbeat-interval", "1"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        probed(cluster, "chat", 1)
        yield cluster, port
    finally:
        proc.kill()
        proc.wait(timeout=10)
        cluster.stop()


def in_a_fresh_driver(mode: str, port: int) -> dict[str, str]:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    done = subprocess.run([sys.executable, "-m", "tests.first_call_driver", mode, "first-calls", str(port)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-6000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["sync", "async", "thread"])
def test_every_public_method_works_as_the_first_call_of_a_fresh_driver(served, mode):
    _, port = served
    results = in_a_fresh_driver(mode, port)
    every = {f"{cls.__name__}.{m}" for cls in (coordinator.Cluster, coordinator.AsyncCluster,
                                                coordinator.RayWorkerManager) for m in public_methods(cls)}
    assert set(results) == every - SKIPPED  # introspected: a new method is covered, or fails for want of arguments
    failed = {k: v for k, v in results.items() if not v.startswith(("ok", "refused"))}
    assert not failed, failed
    refused = {k: v for k, v in results.items() if v.startswith("refused")}
    if mode != "async":
        assert not refused, refused
    else:
        # Only Cluster's blocking calls may refuse inside a running loop, naming their coroutine twin.
        for label, why in refused.items():
            face, method = label.split(".")
            assert face == "Cluster", label
            twin = "config()" if method == "config" else f"{method}(...)"
            assert f"await cluster.aio.{twin}" in why, why
