"""Zero-loss changes, end to end: real reference workers whose models take
``load_s`` to load and abort what is in flight when they stop (as a real
engine does), long streams through RayWorkerManager, and the coordinator's
operations — a rolling restart, a rolling update_params, a shutdown — run
under that load. With draining, no stream is lost; with the drain off
(``drain_timeout=0``), the same rollout cuts streams: the test can fail."""

from __future__ import annotations

import time

import pytest

import coordinator
from tests.conftest import free_port, wait_until
from tests.streamed_load import Stream, StreamedLoad, aborted, refused
from tests.test_traffic import FAST, SLOW_HEARTBEATS, probed

pytestmark = pytest.mark.ray

MODEL = "z"
LOAD_S = 2.0


def streamed(cluster: coordinator.Cluster, streams: int, gateway: str | None = None) -> StreamedLoad:
    """``streams`` callers streaming MODEL back to back (a stream lasts ~2.5 s),
    spread over a stream's length; one whose request failed waits a moment."""
    return StreamedLoad(cluster, MODEL, streams, pause_after_failure=0.05, spread=2.5, gateway=gateway)


def described(streams: list[Stream]) -> list[str]:
    return [f"{'truncated' if s.truncated else 'failed'}: {s.error or s.finish_reason}" for s in streams[:5]]


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
    with streamed(cluster, streams=6) as load:
        started = time.monotonic()
        result = cluster.apply(MODEL, "restart", max_unavailable=1)
        took = time.monotonic() - started
        assert result.output.success, result.output.message
        assert all("drained in" in o.message for o in result.outputs), [o.message for o in result.outputs]
        probed(cluster, MODEL, 4)
        result = cluster.apply(MODEL, "update_params", params={"temperature": 0.3}, max_unavailable=2)
        assert result.output.success, result.output.message
        probed(cluster, MODEL, 4)
        during = len(load.streams)
    assert load.lost() == [], described(load.lost())
    assert aborted(ports) == 0 and refused(ports) == 0  # none reached a stopping or loading instance
    assert during > 20  # the load went on all through
    # Per batch: the drain (a stream's length at most), the load, the health gate.
    assert took < 4 * (LOAD_S + 2.5 + 3) + 10, took

    # The same rollout with the drain off cuts what is in flight.
    with streamed(cluster, streams=6) as load:
        result = cluster.apply(MODEL, "restart", max_unavailable=1, drain_timeout=0)
        assert result.output.success, result.output.message
        probed(cluster, MODEL, 4)
    assert load.lost() and aborted(ports) > 0


def test_a_rolling_restart_through_the_gateway_loses_nothing(fleet):
    cluster, ports = fleet
    base = cluster.serve(port=free_port())
    with streamed(cluster, streams=4, gateway=base) as load:
        result = cluster.apply(MODEL, "restart", max_unavailable=1)
        assert result.output.success, result.output.message
        probed(cluster, MODEL, 4)
        during = len(load.streams)
    assert load.lost() == [], described(load.lost())
    assert aborted(ports) == 0 and refused(ports) == 0 and during > 10


def test_a_shutdown_under_load_drains_first(fleet):
    cluster, ports = fleet
    victim = ports[0]
    with streamed(cluster, streams=4) as load:
        wait_until(lambda: any(r.in_flight for r in cluster.status().instances if r.port == victim), timeout=15,
                   what="a stream on the instance to shut down")
        out = cluster.shutdown({"host": "127.0.0.1", "port": victim, "model": MODEL, "worker_type": "llm"},
                               drain_timeout=20)
        assert out.success and "drained in" in out.message, out.message
        wait_until(lambda: len(load.streams) > 12, timeout=30, what="more streams after the shutdown")
    assert load.lost() == [], described(load.lost())
    assert aborted(ports) == 0


SIM = {"provider": "proxy/sim"}


def test_the_keepers_changes_under_load_lose_nothing(ray_session, worker_process):
    """A deployment's params rolled with max_surge (one replica: no outage),
    scaled up to 4, its params rolled in place (max_unavailable 2), scaled
    4 → 1, and undeployed, under streamed load: the keeper drains every
    instance it stops or reconfigures."""
    cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST, "drain": {"timeout": 30},
                                 "caller": {"report_every": 0.5, "report_ttl": 2}},
                                name="zero-loss-keeper", namespace="tests")
    try:
        url = cluster.registry_url()
        ports = [worker_process(controller=url, heartbeat_interval=1, load_s=LOAD_S, chunks=30,
                                chunk_delay=0.08).port for _ in range(4)]
        wait_until(lambda: sum(1 for r in cluster.status().instances if r.worker_type == "service") == 4,
                   timeout=30, what="4 worker managers")
        cluster.deploy(coordinator.Deployment(model=MODEL, replicas=1, params=SIM, max_surge=1), wait=True,
                       timeout=60)
        with streamed(cluster, streams=3) as load:
            # One replica, new params: the new one is ready before the old one is drained and stopped.
            cluster.deploy(coordinator.Deployment(model=MODEL, replicas=1, params={**SIM, "temperature": 0.2},
                                                  max_surge=1), wait=True, timeout=90)
            [status] = [d for d in cluster.deployments() if d.key == f"{MODEL}@llm"]
            events = [e.action for e in status.events]
            assert "adopt" in events and "update_params" not in events, events
            cluster.deploy(coordinator.Deployment(model=MODEL, replicas=4, params={**SIM, "temperature": 0.2}),
                           wait=True, timeout=90)
            # In place this time: update_params, two instances at a time, each drained first.
            cluster.deploy(coordinator.Deployment(model=MODEL, replicas=4, params={**SIM, "temperature": 0.4},
                                                  max_unavailable=2), wait=True, timeout=90)
            [status] = [d for d in cluster.deployments() if d.key == f"{MODEL}@llm"]
            assert status.events[-1].action == "update_params" and status.events[-1].ok, status.events[-1]
            cluster.deploy(coordinator.Deployment(model=MODEL, replicas=1, params={**SIM, "temperature": 0.4}),
                           wait=True, timeout=90)
            during = len(load.streams)
        assert load.lost() == [], described(load.lost())
        assert during >= 6  # streams of ~2.5 s from 3 callers went on all through
        with streamed(cluster, streams=3) as load:
            cluster.undeploy(MODEL, shutdown=True)
            wait_until(lambda: load.lost(), timeout=60, what="requests finding no instance after the undeploy")
        # What was in flight when the undeploy began finished (none cut or
        # aborted); only requests sent after it found no instance.
        assert all(s.failed and "Cound not found worker instances" in (s.error or "")
                   for s in load.lost()), described(load.lost())
        assert aborted(ports) == 0 and refused(ports) == 0
    finally:
        cluster.stop(forget=True)
