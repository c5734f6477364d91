"""Deployments against DB-GPT 0.8.2 itself: DB-GPT's own model controller and
three of its worker managers (``dbgpt start worker``). The tests run in file
order on one fleet: deploy, SIGKILL a manager, scale down (DB-GPT's shutdown
answers 500 there), and a deployment whose provider does not exist."""

from __future__ import annotations

from collections import defaultdict

import pytest

import coordinator
from coordinator.core.deployments import Deployment
from tests.conftest import free_port, wait_until
from tests.dbgpt_env import start_controller, start_worker_manager

pytestmark = [pytest.mark.ray, pytest.mark.dbgpt]

KEPT = "kept-model"
PARAMS = {"name": KEPT, "provider": "proxy/openai", "api_base": "http://127.0.0.1:9/v1", "api_key": "not-used"}


@pytest.fixture(scope="module")
def fleet(ray_session, dbgpt_bin, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dbgpt-deployments")
    started = []
    try:
        controller = start_controller(dbgpt_bin, free_port(), workdir)
        started.append(controller)
        workers = {}
        for _ in range(3):
            w = start_worker_manager(dbgpt_bin, free_port(), controller.url, workdir)
            started.append(w)
            workers[w.port] = w
        cluster = coordinator.start(
            {
                "registries": [{"kind": "dbgpt", "name": "dbgpt", "url": controller.url, "poll_interval": 0.5}],
                "timeouts": {"apply": 30, "startup": 60, "shutdown": 30, "connect": 2, "rollout_health": 30},
                "reconcile": {"resync_interval": 2, "backoff_initial": 0.5, "backoff_max": 4},
            },
            name="dbgpt-deploy", namespace="tests",
        )
        try:
            cluster.wait_for("WorkerManager", count=3, worker_type="service", timeout=90)
            yield cluster, workers
        finally:
            cluster.stop(forget=True)
    finally:
        for proc in started:
            proc.kill()


def status(cluster, key: str) -> coordinator.DeploymentStatus:
    return next(d for d in cluster.deployments() if d.key == key)


def ports(st: coordinator.DeploymentStatus) -> set[int]:
    return {int(i.rsplit(":", 1)[1]) for i in st.instances}


def test_deploy_two_replicas_on_dbgpt_worker_managers(fleet):
    cluster, workers = fleet
    cluster.deploy(Deployment(model=KEPT, replicas=2, params=PARAMS), wait=True, timeout=90)
    st = status(cluster, f"{KEPT}@llm")
    assert st.state == "ready" and len(ports(st)) == 2 and ports(st) <= set(workers)


def test_a_sigkilled_manager_is_replaced_on_the_third(fleet):
    cluster, workers = fleet
    before = ports(status(cluster, f"{KEPT}@llm"))
    victim = min(before)
    workers[victim].kill()
    [spare] = set(workers) - before
    wait_until(lambda: (st := status(cluster, f"{KEPT}@llm")).state == "ready" and ports(st) == before - {victim} | {spare},
               timeout=60, what="the replacement ready on the third manager")


def test_scale_down_converges_although_dbgpts_shutdown_answers_500(fleet):
    cluster, workers = fleet
    cluster.deploy(Deployment(model=KEPT, replicas=1, params=PARAMS), wait=True, timeout=60)
    st = status(cluster, f"{KEPT}@llm")
    assert st.ready == 1 and st.state == "ready"
    stops = [e for e in st.events if e.action == "stop"]
    # DB-GPT's shutdown fails (no model storage: its deregistration gets 422 from
    # its own controller), so the keeper stopped the instance with an apply stop
    # (on this machine DB-GPT sometimes drops the connection of the apply right
    # after its 500; the next round tries again). One instance stopped, no other.
    assert len({e.endpoint for e in stops}) == 1, "\n".join(map(repr, st.events))
    stop = stops[-1]
    assert stop.ok and "HTTP 500" in stop.message and "apply stop: succeeded" in stop.message, stop
    # DB-GPT's controller then lists the stopped one unhealthy: one healthy instance left.
    wait_until(lambda: len(cluster.instances(KEPT)) == 1, timeout=10, what="one healthy instance")
    assert status(cluster, f"{KEPT}@llm").state == "ready"


def test_an_unknown_provider_fails_with_the_reason_and_backs_off(fleet):
    cluster, _ = fleet
    cluster.deploy(Deployment(model="no-such", replicas=1, params={"name": "no-such", "provider": "no/such"}))
    wait_until(lambda: status(cluster, "no-such@llm").state == "failing", timeout=30, what="failing")
    wait_until(lambda: sum(e.action == "start" for e in status(cluster, "no-such@llm").events) >= 5, timeout=30)
    st = status(cluster, "no-such@llm")
    assert st.ready == 0 and "HTTP 500" in st.last_error, st.last_error
    attempts = defaultdict(list)
    for e in st.events:
        if e.action == "start":
            assert not e.ok
            attempts[e.endpoint].append(e.at)
    for times in attempts.values():  # never a tight loop: each wait on a manager longer than the last
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(g >= 0.4 for g in gaps), gaps
        assert all(later >= 0.9 * earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    cluster.undeploy("no-such")
