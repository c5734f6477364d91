"""Faults injected by killing real things: worker processes, a controller process,
and the project's own actors. Each test asks for an answer within a deadline;
none sleeps for a fixed time to let something happen."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
import ray

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings
from coordinator.core.naming import registry_actor, watcher_actor
from tests.conftest import ROOT, free_port, wait_until

pytestmark = pytest.mark.ray

FAST = {
    "timeouts": {"apply": 10, "connect": 1, "startup": 10, "shutdown": 10, "supports": 5},
    "backoff": {"initial": 0.1, "maximum": 0.5},
    "long_poll_timeout": 2,
}
EMBEDDED = {"kind": "embedded", "name": "reg", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3}


@pytest.fixture
def clusters(ray_session):
    started: list[coordinator.Cluster] = []

    def make(name: str, *registries: dict, **extra) -> coordinator.Cluster:
        cluster = coordinator.start({"registries": list(registries), **FAST, **extra}, name=name, namespace="tests")
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.stop()


def ports_of(outputs) -> dict[int, coordinator.WorkerApplyOutput]:
    return {o.port: o for o in outputs}


def set_faults(port: int, **faults) -> None:
    httpx.post(f"http://127.0.0.1:{port}/api/_reference/faults", json=faults).raise_for_status()


def process_journal(port: int) -> Callable[[], Awaitable[list[dict]]]:
    """The journal of a reference worker process (the worker calls it received)."""

    async def read() -> list[dict]:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"http://127.0.0.1:{port}/api/_reference/journal", timeout=5)).json()

    return read


async def until_in_flight(journal: Callable[[], Awaitable[list[dict]]], apply_type: str, after: int = 0,
                          timeout: float = 20) -> dict:
    """Until an apply of ``apply_type`` (journalled after entry ``after``) has
    reached the worker and is still running there; its journal entry."""
    deadline = time.monotonic() + timeout
    while True:
        running = [e for e in (await journal())[after:]
                   if e["path"] == "/api/worker/apply" and f'"{apply_type}"' in e["body"] and "t_end" not in e]
        if running:
            return running[-1]
        assert time.monotonic() < deadline, f"no {apply_type} running on the worker within {timeout} s"
        await asyncio.sleep(0.05)


def test_worker_killed_mid_apply_fails_only_its_own_output(clusters, worker_process):
    cluster = clusters("kill-worker", EMBEDDED)
    url = cluster.registry_url()
    steady = worker_process("f1@llm", controller=url, heartbeat_interval=1)
    victim = worker_process("f1@llm", controller=url, heartbeat_interval=1)
    cluster.wait_for("f1", count=2, timeout=20)
    assert cluster.apply("f1", "start").success  # both proxies are up
    set_faults(victim.port, latency=3)

    async def apply_and_kill():
        task = asyncio.ensure_future(cluster.aio.apply("f1", "restart"))
        await until_in_flight(process_journal(victim.port), "restart")  # the call is in flight on the victim
        victim.kill()
        return await task

    started = time.monotonic()
    result = asyncio.run(apply_and_kill())
    assert time.monotonic() - started < 10 + 5  # within the operation deadline
    outs = ports_of(result.outputs)
    assert outs[steady.port].success
    assert not outs[victim.port].success
    assert "connection lost" in outs[victim.port].message
    # ...and its proxy notices: the instance leaves the healthy set within 3 s + slack.
    wait_until(lambda: [i.port for i in cluster.instances("f1")] == [steady.port], timeout=5,
               what="killed worker excluded by the probe")


def test_a_hanging_worker_holds_up_nothing_else(clusters, worker_process):
    cluster = clusters("hang", EMBEDDED, timeouts={"apply": 4, "connect": 1})
    url = cluster.registry_url()
    hung = worker_process("slow@llm", controller=url, heartbeat_interval=1)
    fine = worker_process("slow@llm", "quick@llm", controller=url, heartbeat_interval=1)
    cluster.wait_for("slow", count=2, timeout=20)
    cluster.wait_for("quick", count=1, timeout=20)
    set_faults(hung.port, hang=True)

    async def both():
        slow = asyncio.ensure_future(cluster.aio.apply("slow", "restart"))
        quick = await cluster.aio.apply("quick", "restart")
        quick_done_first = not slow.done()
        return await slow, quick, quick_done_first

    slow, quick, quick_done_first = asyncio.run(both())
    assert quick.success and quick_done_first
    outs = ports_of(slow.outputs)
    assert outs[fine.port].success
    assert "no answer within 4 s" in outs[hung.port].message


def test_dbgpt_controller_outage_keeps_the_live_set_and_catches_up(clusters, worker_process):
    port = free_port()

    def controller() -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "actors.registry", "--port", str(port), "--heartbeat-timeout", "60"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdout.readline().startswith("listening on")
        return proc

    proc = controller()
    try:
        url = f"http://127.0.0.1:{port}"
        cluster = clusters("outage", {"kind": "dbgpt", "name": "ctl", "url": url, "poll_interval": 0.2})
        w1 = worker_process("o1@llm", controller=url, heartbeat_interval=1)
        cluster.wait_for("o1", count=1, timeout=20)

        proc.kill()
        proc.wait()
        wait_until(lambda: cluster.status().watchers[0].stale, timeout=10, what="watcher says stale")

        def several_polls_failed() -> bool:
            # Through several failed polls of the outage, nothing is forgotten.
            assert [i.port for i in cluster.instances("o1", healthy_only=False)] == [w1.port]
            return cluster.status().watchers[0].consecutive_failures >= 3

        wait_until(several_polls_failed, timeout=10, what="three polls failed in a row")
        assert [i.port for i in cluster.instances("o1", healthy_only=False)] == [w1.port]
        assert "refused" in cluster.status().watchers[0].last_error

        w2 = worker_process("o1@llm", controller=url, heartbeat_interval=1)  # arrives during the outage
        proc = controller()  # the controller returns, empty; heartbeats re-register
        found = cluster.wait_for("o1", count=2, timeout=20)
        assert {i.port for i in found} == {w1.port, w2.port}
        assert not cluster.status().watchers[0].stale
    finally:
        proc.kill()
        proc.wait()


def test_killed_embedded_registry_restarts_on_its_address_with_its_state(clusters, worker_process):
    cluster = clusters("reg-kill", EMBEDDED)
    url = cluster.registry_url()
    w1 = worker_process("r1@llm", controller=url, heartbeat_interval=1)
    # An entry nobody heartbeats for: only saved state can bring it back.
    quiet = {"model_name": "quiet@llm", "host": "127.0.0.1", "port": w1.port, "check_healthy": False}
    assert httpx.post(f"{url}/api/controller/models", json=quiet).json() is True
    cluster.wait_for("quiet", count=1, timeout=10)

    async def burst() -> list[bool]:
        """200 registrations at once, each answered only once it is saved."""
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=50)) as client:
            answers = await asyncio.gather(*(client.post("/api/controller/models", json={
                **quiet, "model_name": f"burst-{i}@llm"}) for i in range(200)))
        return [r.json() for r in answers]

    registry = ray.get_actor(registry_actor("reg-kill", "reg"), namespace="tests")
    epoch = ray.get(registry.wait_for_change.remote(None, 0)).epoch
    assert asyncio.run(burst()) == [True] * 200
    ray.kill(registry, no_restart=False)  # at once: nothing answered may be lost

    def restarted() -> bool:
        # The live set holds while the registry is away.
        assert {i.model_name for i in cluster.instances(healthy_only=False)} >= {"r1@llm", "quiet@llm"}
        try:
            return ray.get(registry.wait_for_change.remote(None, 0), timeout=2).epoch != epoch
        except (ray.exceptions.RayError, TimeoutError):
            return False

    wait_until(restarted, timeout=30, what="registry actor restarted")
    assert ray.get(registry.ready.remote()) == url  # the same address
    models = {i["model_name"] for i in httpx.get(f"{url}/api/controller/models").json()}
    assert {"quiet@llm", "r1@llm", "WorkerManager@service"} <= models
    assert {f"burst-{i}@llm" for i in range(200)} <= models
    late = {"model_name": "late@llm", "host": "127.0.0.1", "port": w1.port, "check_healthy": False}
    httpx.post(f"{url}/api/controller/models", json=late).raise_for_status()
    cluster.wait_for("late", count=1, timeout=10)


def test_killed_proxy_is_replaced_and_the_next_operation_succeeds(clusters, ray_session):
    cluster = clusters("proxy-kill", EMBEDDED)
    host = ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote()
    try:
        port = ray.get(host.add.remote(WorkerSettings(
            controller=cluster.registry_url(), heartbeat_interval=1, models=[SimModel(name="p1")])))
        cluster.wait_for("p1", count=1, timeout=20)
        coord = ray.get_actor("proxy-kill", namespace="tests")
        proxy = ray.get(coord.proxy_handle.remote("127.0.0.1", port))
        ray.get(host.set_faults.remote(port, latency=2))

        async def apply_and_kill():
            task = asyncio.ensure_future(cluster.aio.apply("p1", "restart"))
            await until_in_flight(lambda: host.journal.remote(port), "restart")  # the proxy awaits its answer
            ray.kill(proxy)
            return await task

        [out] = asyncio.run(apply_and_kill()).outputs
        assert not out.success and "proxy actor died" in out.message
        wait_until(lambda: ray.get(coord.proxy_handle.remote("127.0.0.1", port)) not in (None, proxy),
                   timeout=10, what="a fresh proxy")
        ray.get(host.set_faults.remote(port, latency=0))
        assert cluster.apply("p1", "restart").success
    finally:
        ray.get(host.stop_all.remote())
        ray.kill(host)


def test_killed_coordinator_restarts_and_the_driver_handle_keeps_working(clusters, worker_process):
    cluster = clusters("coord-kill", EMBEDDED)
    w = worker_process("c1@llm", controller=cluster.registry_url(), heartbeat_interval=1)
    cluster.wait_for("c1", count=1, timeout=20)

    coord = ray.get_actor("coord-kill", namespace="tests")
    pid = ray.get(coord.process_info.remote())["pid"]
    ray.kill(coord, no_restart=False)

    def restarted() -> bool:
        started = time.monotonic()
        try:
            during = cluster.instances("c1")  # succeeds, or says why not; never hangs
        except coordinator.CoordinatorUnavailableError:
            during = None
        assert time.monotonic() - started < 60
        assert during in (None, []) or [i.port for i in during] == [w.port]
        try:
            return ray.get(coord.process_info.remote(), timeout=5)["pid"] != pid
        except (ray.exceptions.RayError, TimeoutError):
            return False

    wait_until(restarted, timeout=60, what="coordinator restarted in a new process")
    assert [i.port for i in cluster.wait_for("c1", count=1, timeout=30)] == [w.port]
    assert cluster.apply("c1", "restart").success


def test_killed_watcher_restarts_and_the_coordinator_keeps_its_snapshot(clusters, worker_process):
    cluster = clusters("watch-kill", EMBEDDED)
    url = cluster.registry_url()
    w1 = worker_process("k1@llm", controller=url, heartbeat_interval=1)
    cluster.wait_for("k1", count=1, timeout=20)

    ray.kill(ray.get_actor(watcher_actor("watch-kill", "reg"), namespace="tests"), no_restart=False)
    assert [i.port for i in cluster.instances("k1")] == [w1.port]
    w2 = worker_process("k1@llm", controller=url, heartbeat_interval=1)
    found = cluster.wait_for("k1", count=2, timeout=30)  # the restarted watcher resumes
    assert {i.port for i in found} == {w1.port, w2.port}
    wait_until(lambda: not cluster.status().watchers[0].stale, timeout=10, what="watcher fresh again")


def test_malformed_answers_are_per_instance_failures_with_the_reason(clusters, ray_session):
    cluster = clusters("garbage", EMBEDDED)
    host = ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote()
    kinds = [None, "html", "not_json", "wrong_shape", "truncated"]
    try:
        url = cluster.registry_url()
        ports = ray.get([host.add.remote(WorkerSettings(controller=url, heartbeat_interval=1,
                                                        models=[SimModel(name="g1")])) for _ in kinds])
        cluster.wait_for("g1", count=len(kinds), timeout=20)
        for port, kind in zip(ports, kinds):
            ray.get(host.set_faults.remote(port, garbage=kind))
        outs = ports_of(cluster.apply("g1", "restart").outputs)
        reasons = dict(zip(kinds, (outs[p] for p in ports)))
        assert reasons[None].success
        assert "HTTP 500: <html>" in reasons["html"].message
        assert "answer is not JSON" in reasons["not_json"].message
        assert "not a WorkerApplyOutput" in reasons["wrong_shape"].message
        assert "connection lost" in reasons["truncated"].message
        assert sum(not o.success for o in outs.values()) == 4
    finally:
        ray.get(host.stop_all.remote())
        ray.kill(host)


def test_a_worker_that_comes_back_is_reachable_again_without_anyone_acting(clusters, worker_process):
    cluster = clusters("comeback", EMBEDDED)
    url = cluster.registry_url()
    first = worker_process("b1@llm", controller=url, heartbeat_interval=1)
    cluster.wait_for("b1", count=1, timeout=20)
    first.kill()
    wait_until(lambda: not cluster.instances("b1"), timeout=10, what="dead worker excluded")
    out = cluster.apply("b1", "start").outputs[0]
    assert not out.success and ("unreachable" in out.message or "refused" in out.message)
    worker_process("b1@llm", controller=url, heartbeat_interval=1, port=first.port)
    cluster.wait_for("b1", count=1, timeout=20)
    wait_until(lambda: all(r.reachable for r in cluster.status().instances if r.port == first.port),
               timeout=10, what="probe sees it again")
    assert cluster.apply("b1", "start").success


def test_a_driver_timeout_travels_with_the_operation_and_the_next_waits_for_it(clusters, worker_process):
    """A driver that allows 6 s gets its answer within it: the worker calls
    were bounded by that deadline. A driver that gave up earlier (its call
    cancelled) does not free the model for the next operation before the
    first one's worker call has ended."""
    cluster = clusters("deadline", EMBEDDED)
    url = cluster.registry_url()
    slow = worker_process("late@llm", controller=url, heartbeat_interval=1)
    cluster.wait_for("late", count=1, timeout=20)
    set_faults(slow.port, hang=True)
    started = time.monotonic()
    [out] = cluster.apply("late", "restart", timeout=6).outputs
    assert time.monotonic() - started < 6 + 1.0  # liveness: answered about when the driver stops waiting
    assert not out.success and "no answer within" in out.message
    set_faults(slow.port, hang=False, latency=2)
    mark = len(httpx.get(f"http://127.0.0.1:{slow.port}/api/_reference/journal").json())  # the hung call stays

    async def give_up_then_apply_again():
        first = asyncio.ensure_future(cluster.aio.apply("late", "restart"))
        await until_in_flight(process_journal(slow.port), "restart", after=mark)
        first.cancel()  # the driver walks away while the worker call runs; the operation does not
        return time.time(), await cluster.aio.apply("late", "start")

    gave_up, out = asyncio.run(give_up_then_apply_again())
    assert out.success
    calls = [e for e in httpx.get(f"http://127.0.0.1:{slow.port}/api/_reference/journal").json()[mark:]
             if e["path"] == "/api/worker/apply"]
    restart, start = calls
    assert '"restart"' in restart["body"] and '"start"' in start["body"]
    assert gave_up < restart["t_end"]  # the driver gave up before the restart's worker call ended...
    assert start["t"] >= restart["t_end"]  # ...and the start arrived only after it had


def test_a_proxy_that_keeps_dying_is_replaced_with_backoff(clusters, worker_process):
    """The first death is repaired at once; a proxy that dies again soon after
    it started is replaced only after the back-off (4 s here), never in a tight
    loop."""
    cluster = clusters("proxy-loop", EMBEDDED, backoff={"initial": 4, "maximum": 8})
    worker = worker_process("loop@llm", controller=cluster.registry_url(), heartbeat_interval=1)
    cluster.wait_for("loop", count=1, timeout=20)
    coord = ray.get_actor("proxy-loop", namespace="tests")

    def current():
        return ray.get(coord.proxy_handle.remote("127.0.0.1", worker.port))

    gaps = []
    for _ in range(2):
        proxy = current()
        ray.get(proxy.probe_state.remote())  # started
        killed = time.monotonic()
        ray.kill(proxy)
        wait_until(lambda: current() not in (None, proxy), timeout=20, what="a fresh proxy")
        gaps.append(time.monotonic() - killed)
    assert gaps[0] < 4.0  # the first death: replaced at once (liveness, generous)
    assert gaps[1] >= 4.0  # died again within a minute of starting: backed off
