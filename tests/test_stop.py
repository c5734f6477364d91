"""Stopping a coordinator: everything of its name goes, whether it answers or
not, and its deployments stay kept for the next start unless told to forget."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
import ray
from click.testing import CliRunner
from ray.experimental import internal_kv
from ray.util.state import list_actors

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings
from actors.registry_state import GcsStateStore
from coordinator.driver.cli import cli
from coordinator.core.naming import deployments_key
from coordinator.driver.install import stop as stop_by_name
from coordinator.core.deployments import Deployment
from coordinator.core.naming import registry_actor
from tests.conftest import wait_until

pytestmark = pytest.mark.ray

NS = "tests"
CONFIG = {
    "registries": [{"kind": "embedded", "name": "reg", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3}],
    "timeouts": {"apply": 5, "connect": 1},
}
KEPT = Deployment(model="kept-across", replicas=0)


def kv(key: str) -> bytes | None:
    return internal_kv._internal_kv_get(key, namespace=GcsStateStore.NAMESPACE)


def named_actors_of(name: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NS and (a["name"] == name or a["name"].startswith(f"{name}/")))


def alive_actors_of(dashboard: str, name: str) -> list[str]:
    # The session's dashboard, named: more than one Ray may run on this machine.
    rows = list_actors(address=dashboard, filters=[("ray_namespace", "=", NS), ("state", "!=", "DEAD")],
                       limit=10_000)
    return sorted(r.name for r in rows if r.name == name or (r.name or "").startswith(f"{name}/"))


def actor_state(dashboard: str, actor_id: str) -> str:
    [row] = list_actors(address=dashboard, filters=[("actor_id", "=", actor_id)])
    return row.state


def test_a_hung_coordinator_is_stopped_with_its_watchers_registries_proxies_and_records(ray_session):
    name = "stop-hung"
    cluster = coordinator.start(CONFIG, name=name, namespace=NS, detached=True)
    host = ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote()
    pid = None
    try:
        port = ray.get(host.add.remote(WorkerSettings(controller=cluster.registry_url(), heartbeat_interval=1,
                                                      models=[SimModel(name="hung-model")])))
        cluster.wait_for("hung-model", count=1, timeout=30)
        cluster.deploy(KEPT)
        assert kv(deployments_key(name, NS)) is not None
        assert internal_kv._internal_kv_list(registry_actor(name, "reg"), namespace=GcsStateStore.NAMESPACE)
        coord = ray.get_actor(name, namespace=NS)
        proxy = wait_until(lambda: ray.get(coord.proxy_handle.remote("127.0.0.1", port)), timeout=30,
                           what="a proxy for the worker")
        proxy_id = proxy._actor_id.hex()
        assert alive_actors_of(ray_session, name) == [name, f"{name}/registry/reg", f"{name}/watcher/reg"]

        pid = ray.get(coord.process_info.remote())["pid"]
        os.kill(pid, signal.SIGSTOP)  # hung: no method of it answers any more

        cluster.stop(forget=True)

        wait_until(lambda: named_actors_of(name) == [] and alive_actors_of(ray_session, name) == [],
                   timeout=30, interval=0.5, what="no actor of its name left")
        wait_until(lambda: actor_state(ray_session, proxy_id) == "DEAD", timeout=60, interval=0.5,
                   what="its proxy dead with it")
        assert kv(deployments_key(name, NS)) is None
        assert internal_kv._internal_kv_list(registry_actor(name, "reg"), namespace=GcsStateStore.NAMESPACE) == []
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        ray.get(host.stop_all.remote())
        ray.kill(host)
        stop_by_name(name, NS, forget=True)


def test_stop_keeps_the_deployments_for_the_next_start_unless_told_to_forget(ray_session):
    name = "stop-keep"
    cluster = coordinator.start(CONFIG, name=name, namespace=NS)
    try:
        assert cluster.deploy(KEPT) == [1]
        cluster.stop()
        assert named_actors_of(name) == []

        cluster = coordinator.start(CONFIG, name=name, namespace=NS)  # no deployments in its config
        assert [(d.key, d.generation) for d in cluster.deployments()] == [("kept-across@llm", 1)]
        cluster.stop(forget=True)

        cluster = coordinator.start(CONFIG, name=name, namespace=NS)
        assert cluster.deployments() == []
    finally:
        cluster.stop(forget=True)
    assert kv(deployments_key(name, NS)) is None


@pytest.mark.anyio
async def test_the_async_stop_keeps_or_forgets_too(ray_session):
    name = "stop-aio"
    cluster = coordinator.start(CONFIG, name=name, namespace=NS)
    try:
        await cluster.aio.deploy(KEPT)
        await cluster.aio.stop()
        assert kv(deployments_key(name, NS)) is not None
        cluster = coordinator.start(CONFIG, name=name, namespace=NS)
        await cluster.aio.stop(forget=True)
        assert kv(deployments_key(name, NS)) is None
    finally:
        stop_by_name(name, NS, forget=True)


def cli_run(name: str, *args: str):
    return CliRunner().invoke(cli, ["--name", name, "--namespace", NS, *args], catch_exceptions=False)


def test_cli_stop_keeps_deployments_and_stop_forget_deletes_them(ray_session, tmp_path):
    name = "stop-cli"
    config = tmp_path / "coordinator.yaml"
    config.write_text("registries:\n  - {kind: embedded, name: reg, port: 0}\n")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("deployments:\n  - {model: cli-kept-across, replicas: 0}\n")
    try:
        assert cli_run(name, "start", "--config", str(config)).exit_code == 0
        assert cli_run(name, "deploy", str(fleet)).exit_code == 0
        stopped = cli_run(name, "stop")
        assert stopped.exit_code == 0 and "its deployments are kept" in stopped.output

        assert cli_run(name, "start", "--config", str(config)).exit_code == 0
        assert [d["model"] for d in json.loads(cli_run(name, "deployments", "--json").output)] == ["cli-kept-across"]
        stopped = cli_run(name, "stop", "--forget")
        assert stopped.exit_code == 0 and "its deployments are forgotten" in stopped.output

        assert cli_run(name, "start", "--config", str(config)).exit_code == 0
        assert cli_run(name, "deployments", "--json").output.strip() == "[]"
    finally:
        cli_run(name, "stop", "--forget")


def test_cli_stop_removes_what_a_dead_coordinator_left(ray_session, tmp_path):
    name = "stop-dead"
    cluster = coordinator.start(CONFIG, name=name, namespace=NS, detached=True)
    cluster.deploy(KEPT)
    ray.kill(ray.get_actor(name, namespace=NS), no_restart=True)
    wait_until(lambda: named_actors_of(name) == [f"{name}/registry/reg", f"{name}/watcher/reg"], timeout=30,
               what="the coordinator gone, its parts left")

    stopped = cli_run(name, "stop", "--forget")

    assert stopped.exit_code == 0, stopped.output
    assert "was not running; removed what was left of it" in stopped.output
    wait_until(lambda: named_actors_of(name) == [] and alive_actors_of(ray_session, name) == [],
               timeout=30, interval=0.5, what="no actor of its name left")
    assert kv(deployments_key(name, NS)) is None
    nothing = cli_run(name, "stop")
    assert nothing.exit_code == 0 and "nothing to stop" in nothing.output
