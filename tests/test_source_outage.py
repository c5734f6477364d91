"""A source that never answered is not empty. A watcher restarted while its
source is down used to answer with an empty snapshot of a new epoch, and the
coordinator replaced that source's entries with nothing: every proxy retired,
every caller's routes gone, while the workers were serving all along. Here the
coordinator keeps what it holds until the source answers again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import ray

import coordinator
from coordinator.core.naming import registry_actor, watcher_actor
from tests.conftest import ROOT, free_port, wait_until
from tests.test_traffic import FAST

pytestmark = pytest.mark.ray

EMBEDDED = {"kind": "embedded", "name": "reg", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 30}
CHAT = {"messages": [{"role": "human", "content": "hello"}]}


@pytest.fixture
def clusters(ray_session):
    started: list[coordinator.Cluster] = []

    def make(name: str, *registries: dict) -> coordinator.Cluster:
        cluster = coordinator.start({"registries": list(registries), **FAST}, name=name, namespace="tests")
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.stop()


def who(output: coordinator.ModelOutput) -> int:
    """The port of the reference worker that wrote the answer."""
    return int(output.text.split("[127.0.0.1:", 1)[1].split("]", 1)[0])


def probed(cluster: coordinator.Cluster, model: str, count: int) -> None:
    wait_until(lambda: sum(1 for r in cluster.status().instances if r.model == model and r.reachable) == count,
               timeout=30, what=f"{count} probed instances of {model}")


def generate(manager: coordinator.RayWorkerManager, model: str) -> coordinator.ModelOutput:
    return asyncio.run(manager.generate({"model": model, **CHAT}))


class Held:
    """What must not change while a source is away: the coordinator's proxies
    and live instances, and a caller's routes (each generate is dispatched from
    the caller's copy of the route table)."""

    def __init__(self, cluster: coordinator.Cluster, manager: coordinator.RayWorkerManager, model: str,
                 ports: set[int]) -> None:
        self.cluster, self.manager, self.model, self.ports = cluster, manager, model, ports

    def check(self) -> None:
        st = self.cluster.status()
        assert st.proxies == len(self.ports), f"proxies retired: {st.proxies} of {len(self.ports)} left"
        listed = {r.port for r in st.instances if r.model == self.model}
        assert listed == self.ports, f"instances forgotten: {listed}"
        out = generate(self.manager, self.model)
        assert out.success, out.text
        assert who(out) in self.ports

    def through(self, done, timeout: float, what: str) -> None:
        """Check at every turn until ``done()`` (a deadline for liveness)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if done():
                return
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
            time.sleep(0.1)

    def for_seconds(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        self.through(lambda: time.monotonic() > until, seconds + 60, "")


def watcher_pid(cluster: coordinator.Cluster, source: str) -> int | None:
    try:
        actor = ray.get_actor(watcher_actor(cluster.name, source), namespace="tests")
        return ray.get(actor.process_info.remote(), timeout=2)["pid"]
    except (ray.exceptions.RayError, TimeoutError, ValueError):
        return None


def test_watcher_and_registry_killed_together_retire_nothing(clusters, worker_process):
    """The restarted watcher's first fetch fails (the registry is down), and the
    restarted registry's first answers come before or after it has loaded its
    saved entries: neither may reach the coordinator as an empty registry."""
    cluster = clusters("outage-both", EMBEDDED)
    url = cluster.registry_url()
    ports = {worker_process("o1@llm", controller=url, heartbeat_interval=1).port for _ in range(2)}
    probed(cluster, "o1", 2)
    manager = coordinator.RayWorkerManager(cluster)
    held = Held(cluster, manager, "o1", ports)
    held.check()

    watcher = ray.get_actor(watcher_actor("outage-both", "reg"), namespace="tests")
    registry = ray.get_actor(registry_actor("outage-both", "reg"), namespace="tests")
    pid = watcher_pid(cluster, "reg")
    ray.kill(registry, no_restart=False)
    ray.kill(watcher, no_restart=False)

    def restarted_watcher_failed() -> bool:
        """The registry is kept down (killed again as it comes back) until the
        restarted watcher's first fetch has failed: the case that emptied it."""
        ray.kill(registry, no_restart=False)
        if watcher_pid(cluster, "reg") in (None, pid):
            return False
        w = cluster.status().watchers[0]
        return w.consecutive_failures >= 1 and "registry unavailable" in (w.last_error or "")

    held.through(restarted_watcher_failed, timeout=60, what="the restarted watcher failing against the registry")
    held.for_seconds(1.5)

    def back() -> bool:
        new = watcher_pid(cluster, "reg")
        return new not in (None, pid) and not cluster.status().watchers[0].stale

    held.through(back, timeout=60, what="watcher and registry back, the watcher fresh")
    held.for_seconds(2)  # a few long polls after: still nothing retired
    late = worker_process("o1@llm", controller=url, heartbeat_interval=1)  # a new registration
    probed(cluster, "o1", 3)
    wait_until(lambda: who(generate(manager, "o1")) == late.port, timeout=30, what="the newcomer dispatched to")


def test_a_dbgpt_controller_down_while_its_watcher_restarts_keeps_the_entries(clusters, worker_process):
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def controller() -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "actors.registry", "--port", str(port), "--heartbeat-timeout", "60"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdout.readline().startswith("listening on")
        return proc

    proc = controller()
    try:
        cluster = clusters("outage-dbgpt", {"kind": "dbgpt", "name": "ctl", "url": url, "poll_interval": 0.2})
        first = worker_process("d1@llm", controller=url, heartbeat_interval=1)
        probed(cluster, "d1", 1)
        assert cluster.config  # read before any async call (RayWorkerManager's first call reads it, blocking)
        manager = coordinator.RayWorkerManager(cluster)
        held = Held(cluster, manager, "d1", {first.port})
        held.check()

        proc.kill()
        proc.wait()
        pid = watcher_pid(cluster, "ctl")
        ray.kill(ray.get_actor(watcher_actor("outage-dbgpt", "ctl"), namespace="tests"), no_restart=False)

        def restarted_and_failing() -> bool:
            if watcher_pid(cluster, "ctl") in (None, pid):
                return False
            w = cluster.status().watchers[0]
            return w.consecutive_failures >= 3 and w.stale and "refused" in (w.last_error or "")

        held.through(restarted_and_failing, timeout=60, what="the restarted watcher failing against the controller")
        held.for_seconds(1.5)
        w = cluster.status().watchers[0]
        assert not w.ready and w.version == 0  # it has not answered: nothing from it was taken

        # Back, empty (as a DB-GPT controller comes back): the worker's next
        # heartbeat registers it again, and dispatch goes on.
        proc = controller()
        wait_until(lambda: cluster.status().watchers[0].ready, timeout=30, what="the watcher answering")
        wait_until(lambda: not cluster.status().watchers[0].stale, timeout=10, what="watcher fresh")
        probed(cluster, "d1", 1)
        held.check()
        second = worker_process("d1@llm", controller=url, heartbeat_interval=1)
        probed(cluster, "d1", 2)
        wait_until(lambda: who(generate(manager, "d1")) == second.port, timeout=30,
                   what="the newcomer dispatched to")
        assert generate(manager, "d1").success
    finally:
        proc.kill()
        proc.wait()
