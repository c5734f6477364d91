"""Against DB-GPT 0.8.2 itself: the coordinator following DB-GPT's own model
controller, dispatching to two DB-GPT worker managers (``dbgpt start worker``).

The tests run in file order on one fleet; the last one kills a worker manager.
"""

from __future__ import annotations

import httpx
import pytest

import coordinator
from tests.conftest import free_port, wait_until
from tests.dbgpt_env import start_controller, start_worker_manager

pytestmark = [pytest.mark.ray, pytest.mark.dbgpt]

MODEL = "chatgpt-test"


@pytest.fixture(scope="module")
def dbgpt_fleet(ray_session, dbgpt_bin, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dbgpt-controller")
    started = []
    try:
        controller = start_controller(dbgpt_bin, free_port(), workdir)
        started.append(controller)
        workers = [start_worker_manager(dbgpt_bin, free_port(), controller.url, workdir) for _ in range(2)]
        started += workers
        cluster = coordinator.start(
            {
                "registries": [{"kind": "dbgpt", "name": "dbgpt", "url": controller.url, "poll_interval": 0.5}],
                "timeouts": {"apply": 30, "startup": 60, "shutdown": 60, "connect": 2},
            },
            name="interop-dbgpt", namespace="tests",
        )
        try:
            # DB-GPT may register the model before the worker manager itself.
            cluster.wait_for("WorkerManager", count=2, worker_type="service", timeout=60)
            cluster.wait_for(MODEL, count=2, timeout=60)
            yield cluster, controller, workers
        finally:
            cluster.stop()
    finally:
        for proc in started:
            proc.kill()


def message(port: int, verb: str, model: str = MODEL) -> str:
    """DB-GPT's own words for a successful start/stop."""
    return f"model {model}@proxy/openai(127.0.0.1:{port}) {verb} successfully"


def dbgpt_lists(controller, key: str) -> dict[int, bool]:
    """What DB-GPT's controller says: port -> healthy, for one worker key."""
    rows = httpx.get(f"{controller.url}/api/controller/models", params={"model_name": key}, timeout=5).json()
    return {r["port"]: r["healthy"] for r in rows}


def test_sees_dbgpts_worker_managers_and_models(dbgpt_fleet):
    cluster, _, workers = dbgpt_fleet
    ports = sorted(w.port for w in workers)
    assert sorted(i.port for i in cluster.instances("WorkerManager", "service")) == ports
    assert sorted(i.port for i in cluster.instances(MODEL)) == ports


@pytest.mark.parametrize(
    ("apply_type", "params", "expected"),
    [
        ("stop", None, lambda port: message(port, "stop")),
        ("start", None, lambda port: message(port, "start")),
        ("restart", None, lambda port: message(port, "start")),  # DB-GPT reports a restart as its start
        ("update_params", {"concurrency": 7}, lambda port: "Update worker params and restart successfully"),
        ("update_params", {"concurrency": 7}, lambda port: "Update worker params successfully"),  # no change
    ],
)
def test_apply_gives_one_output_per_dbgpt_worker_in_dbgpts_words(dbgpt_fleet, apply_type, params, expected):
    cluster, controller, workers = dbgpt_fleet
    ports = sorted(w.port for w in workers)
    # After a stop DB-GPT lists the model unhealthy; an apply targets it all the same.
    wait_until(lambda: sorted(dbgpt_lists(controller, f"{MODEL}@llm")) == ports, 10, what="both listed")
    wait_until(lambda: len(cluster.instances(MODEL, healthy_only=False)) == 2, 10, what="coordinator sees both")
    result = cluster.apply(MODEL, apply_type, params=params)
    assert sorted(o.port for o in result.outputs) == ports
    drains = apply_type != "start"  # what takes an instance out of service is drained first, and says so
    for out in result.outputs:
        assert out.success, out.message
        words, _, drained = out.message.partition(" (drained in ")
        assert words == expected(out.port)
        assert drained.endswith(" s, 0 in flight)") if drains else not drained
    assert result.output.success


def test_supported_models_merges_both_dbgpt_workers(dbgpt_fleet):
    cluster, _, workers = dbgpt_fleet
    merged = cluster.supported_models()
    assert sorted(s.port for s in merged) == sorted(w.port for w in workers)
    for worker in merged:
        assert any(m.provider == "proxy/openai" for m in worker.models)
    assert all(outcome.error is None for outcome in cluster.supports())


def test_startup_and_shutdown_reach_dbgpt_and_are_reported_as_it_answers(dbgpt_fleet):
    cluster, controller, workers = dbgpt_fleet
    target = workers[0]
    req = {
        "host": "127.0.0.1", "port": target.port, "model": "second-model", "worker_type": "llm",
        "params": {"name": "second-model", "provider": "proxy/openai",
                   "api_base": "http://127.0.0.1:9/v1", "api_key": "not-used"},
    }
    started = cluster.startup(req)
    assert started.success, started.message
    # DB-GPT registered it with its controller, and the coordinator saw it arrive.
    assert dbgpt_lists(controller, "second-model@llm") == {target.port: True}
    cluster.wait_for("second-model", count=1, timeout=10)

    # DB-GPT stops the model, then fails to deregister it (no model storage
    # configured) and answers 500: reported as a failure, with the status.
    stopped = cluster.shutdown(req)
    assert not stopped.success
    assert f"127.0.0.1:{target.port}: shutdown second-model@llm failed: HTTP 500" in stopped.message
    assert (stopped.host, stopped.port) == ("127.0.0.1", target.port)


def test_killed_dbgpt_worker_is_excluded_while_dbgpts_controller_still_lists_it_healthy(dbgpt_fleet):
    cluster, controller, workers = dbgpt_fleet
    survivor, victim = workers
    victim.kill()
    wait_until(
        lambda: [i.port for i in cluster.instances(MODEL)] == [survivor.port],
        timeout=10, what="the coordinator excludes the killed worker within 10 s",
    )
    # DB-GPT's controller still calls it healthy (its heartbeat timeout is far longer).
    assert dbgpt_lists(controller, f"{MODEL}@llm")[victim.port] is True
    result = cluster.apply(MODEL, "start")
    outs = {o.port: o for o in result.outputs}
    assert outs[survivor.port].success
    assert not outs[victim.port].success and "unreachable" in outs[victim.port].message
