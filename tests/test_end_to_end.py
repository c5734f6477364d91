"""End to end on the session's local Ray, over real HTTP on loopback: the embedded
registry, reference workers in a Ray actor, the coordinator and its proxies, and a
static source listing an instance whose port is closed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import ray
from pydantic import ValidationError

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings
from tests.conftest import ROOT, free_port, wait_until

pytestmark = pytest.mark.ray

MODEL = "e2e"


@pytest.fixture(scope="module")
def fleet(ray_session):
    closed = free_port()
    cluster = coordinator.start(
        {
            "registries": [
                {"kind": "embedded", "name": "main", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3},
                {"kind": "static", "name": "ghosts", "instances": [
                    {"model_name": f"{MODEL}@llm", "host": "127.0.0.1", "port": closed, "healthy": True}]},
            ],
            "timeouts": {"apply": 3, "connect": 1},
        },
        name="e2e",
        namespace="tests",
    )
    host = ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote()
    url = cluster.registry_url("main")
    ports = ray.get([
        host.add.remote(WorkerSettings(controller=url, heartbeat_interval=1, models=[SimModel(name=MODEL)]))
        for _ in range(3)
    ])
    cluster.wait_for(MODEL, count=3, timeout=30)
    yield cluster, host, ports, closed
    ray.get(host.stop_all.remote())
    ray.kill(host)
    cluster.stop()


def journal(host, port) -> list[dict]:
    return ray.get(host.journal.remote(port))


def by_port(result) -> dict[int, coordinator.WorkerApplyOutput]:
    return {o.port: o for o in result.outputs}


def test_apply_reports_every_instance_including_the_one_whose_port_is_closed(fleet):
    cluster, _, ports, closed = fleet
    result = cluster.apply(MODEL, "restart")
    outs = by_port(result)
    assert sorted(outs) == sorted([*ports, closed])
    for port in ports:
        assert outs[port].success, outs[port].message
        # The worker's own words, then what draining it first took.
        words, _, drained = outs[port].message.partition(" (drained in ")
        assert words == f"model {MODEL}@proxy/openai(127.0.0.1:{port}) start successfully"
        assert drained.endswith(" s, 0 in flight)")
    ghost = outs[closed]
    assert not ghost.success
    assert f"127.0.0.1:{closed}: apply restart {MODEL}@llm" in ghost.message
    assert "refused" in ghost.message or "unreachable" in ghost.message
    assert result.output.success is False
    assert result.output.message == "\n;".join(o.message for o in result.outputs)


def test_a_500_and_a_hang_are_reported_per_instance_while_the_others_succeed(fleet):
    cluster, host, ports, closed = fleet
    ok, failing, hanging = ports
    ray.get(host.set_faults.remote(failing, fail_next=1))
    ray.get(host.set_faults.remote(hanging, hang=True))
    try:
        outs = by_port(cluster.apply(MODEL, "start"))
    finally:
        ray.get(host.set_faults.remote(hanging, hang=False))
    assert outs[ok].success
    assert not outs[failing].success and "HTTP 500: Internal Server Error" in outs[failing].message
    assert not outs[hanging].success and "no answer within 3 s" in outs[hanging].message
    assert not outs[closed].success


def test_startup_and_shutdown_reach_the_named_worker_manager(fleet):
    cluster, host, ports, _ = fleet
    req = coordinator.WorkerStartupRequest(
        host="127.0.0.1", port=ports[1], model="e2e-second", worker_type="llm",
        params={"provider": "proxy/openai"},
    )
    out = cluster.startup(req)
    assert out.success and out.port == ports[1]
    [inst] = cluster.wait_for("e2e-second", count=1, timeout=10)
    assert inst.port == ports[1]
    supports = {s.port: {m.model for m in s.models} for s in cluster.supported_models()}
    assert supports[ports[1]] == {MODEL, "e2e-second"} and supports[ports[0]] == {MODEL}
    out = cluster.shutdown(req)
    assert out.success
    wait_until(lambda: not cluster.instances("e2e-second", healthy_only=False), what="shut-down model deregistered")
    again = cluster.shutdown(req)  # nothing to shut down: the worker answers 500
    assert not again.success and "HTTP 500" in again.message


def test_startup_to_an_endpoint_no_registry_lists_raises_and_sends_nothing(fleet):
    cluster, host, ports, _ = fleet
    before = [len(journal(host, p)) for p in ports]
    with pytest.raises(coordinator.UnknownEndpointError, match="127.0.0.1:1$"):
        cluster.startup({"host": "127.0.0.1", "port": 1, "model": "x", "worker_type": "llm"})
    with pytest.raises(coordinator.NoInstancesError, match="ghost@llm"):
        cluster.apply("ghost", "start")
    assert [len(journal(host, p)) for p in ports] == before


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.apply(MODEL, "explode"),
        lambda c: c.apply(MODEL, "start", worker_type="gpu"),
        lambda c: c.apply(MODEL, "start", params=["not", "a", "dict"]),
        lambda c: c.startup({"host": "127.0.0.1", "port": 70000, "model": "x", "worker_type": "llm"}),
        lambda c: c.shutdown({"host": "127.0.0.1", "port": 1}),
    ],
)
def test_bad_input_is_rejected_in_the_driver_before_anything_is_sent(fleet, call):
    cluster, host, ports, _ = fleet
    before = [len(journal(host, p)) for p in ports]
    with pytest.raises(ValidationError):
        call(cluster)
    assert [len(journal(host, p)) for p in ports] == before


def test_two_applies_to_the_same_model_are_serialised_in_arrival_order(fleet):
    cluster, host, ports, _ = fleet
    port = ports[0]
    ray.get(host.set_faults.remote(port, latency=0.5))
    mark = len(journal(host, port))

    async def both():
        first = asyncio.ensure_future(cluster.aio.apply(MODEL, "stop"))
        second = asyncio.ensure_future(cluster.aio.apply(MODEL, "start"))
        return await asyncio.gather(first, second)

    try:
        results = asyncio.run(both())
    finally:
        ray.get(host.set_faults.remote(port, latency=0.0))
    assert all(by_port(r)[port].success for r in results)
    seen = [e for e in journal(host, port)[mark:] if e["path"] == "/api/worker/apply"]
    assert [json.loads(e["body"])["apply_type"] for e in seen] == ["stop", "start"]
    # The second reached the worker only after the first had been answered
    # (the first takes at least the injected 0.5 s).
    assert seen[1]["t"] - seen[0]["t"] >= 0.5


def test_status_shows_watchers_and_the_unreachable_instance(fleet):
    cluster, _, ports, closed = fleet

    def ghost_unreachable():
        rows = [r for r in cluster.status().instances if r.port == closed]
        return rows and rows[0].reachable is False

    wait_until(ghost_unreachable, timeout=15, what="closed port probed unreachable")
    status = cluster.status()
    assert {w.source for w in status.watchers} == {"main", "ghosts"}
    assert all(w.ready and not w.stale for w in status.watchers)
    ghost = [r for r in status.instances if r.port == closed][0]
    assert ghost.registry_healthy and "unreachable" in ghost.why_unhealthy
    assert sorted(i.port for i in cluster.instances(MODEL)) == sorted(ports)
    assert len(cluster.instances(MODEL, healthy_only=False)) == 4


def test_dbgpt_style_facade(fleet):
    cluster, _, ports, _ = fleet
    manager = coordinator.RayWorkerManager(coordinator.attach("e2e", namespace="tests"))

    async def drive():
        out = await manager.worker_apply(coordinator.WorkerApplyRequest(model=MODEL, apply_type="restart"))
        models = await manager.supported_models()
        # The restart takes each instance out of healthy_only for a moment: compare the two getters once
        # every instance is back, not while one of them may be changing between the two reads.
        await cluster.aio.wait_for(MODEL, count=len(ports), timeout=30)
        insts = await manager.get_model_instances("llm", MODEL)
        return out, models, insts

    out, models, insts = asyncio.run(drive())
    assert out.message.count("\n;") == 3  # every instance, not just the first
    assert {m.port for m in models} == set(ports)
    assert sorted(i.port for i in insts) == sorted(ports)
    assert sorted(i.port for i in manager.sync_get_model_instances("llm", MODEL)) == sorted(i.port for i in insts)


def test_sync_calls_refuse_to_block_an_event_loop(fleet):
    cluster = fleet[0]

    async def misuse():
        cluster.instances()

    with pytest.raises(RuntimeError, match="cluster.aio.instances"):
        asyncio.run(misuse())


def test_attaching_to_a_name_that_is_not_running_is_a_clear_error(ray_session):
    with pytest.raises(coordinator.CoordinatorNotFoundError, match="'nobody'"):
        coordinator.attach("nobody", namespace="tests")


def test_a_registry_port_in_use_fails_start_and_leaves_nothing_behind(ray_session):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(coordinator.CoordinatorError, match=f"127.0.0.1:{port}"):
            coordinator.start({"registries": [{"kind": "embedded", "port": port}]}, name="clash", namespace="tests")
    names = ["clash", "clash/watcher/embedded-0", "clash/registry/embedded-0"]
    wait_until(lambda: not any(_alive(n) for n in names), what="half-started actors removed")


def _alive(name: str) -> bool:
    try:
        ray.get_actor(name, namespace="tests")
    except ValueError:
        return False
    return True


def test_quick_start_runs_and_prints_every_step():
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    done = subprocess.run(
        [sys.executable, "examples/quickstart.py"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for needle in ("embedded registry", "supports chatgpt-test@llm", "startup second-model",
                   "restart chatgpt-test: combined success=True", "shutdown second-model", "stopped cleanly"):
        assert needle in out, out
    assert out.count("start successfully") == 3


def test_starting_a_running_coordinator_with_another_config_raises_naming_the_difference(fleet):
    cluster, *_ = fleet
    same = cluster.config.model_dump(mode="json")
    assert coordinator.start(same, name="e2e", namespace="tests").name == "e2e"  # the same config: attached
    other = {**same, "timeouts": {**same["timeouts"], "apply": 99}}
    with pytest.raises(coordinator.CoordinatorError, match=r"differs in: timeouts\).*attach\(\)"):
        coordinator.start(other, name="e2e", namespace="tests")
    assert asyncio.run(cluster.aio.registry_url("main")) == cluster.registry_url("main")
