"""The command line, in-process against the session's Ray: a detached start from a
config file, then the operator's commands, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray
from click.testing import CliRunner

from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings
from coordinator.driver.cli import cli
from tests.conftest import ROOT

pytestmark = pytest.mark.ray

BASE = ["--name", "cli", "--namespace", "tests"]


def run(*args: str):
    return CliRunner().invoke(cli, [*BASE, *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def deployed(ray_session, tmp_path_factory):
    config = tmp_path_factory.mktemp("cli") / "coordinator.yaml"
    config.write_text(
        "registries:\n"
        "  - {kind: embedded, name: reg, port: 0, heartbeat_interval: 1, heartbeat_timeout: 3}\n"
        "timeouts: {apply: 5, connect: 1}\n"
    )
    result = run("start", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "watching registry reg: 0 instances" in result.output
    # what a worker can use, not a bind address
    assert "registry reg for workers (their controller_addr): http://127.0.0.1:" in result.output
    import coordinator

    cluster = coordinator.attach("cli", namespace="tests")
    host = ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote()
    ports = ray.get([host.add.remote(WorkerSettings(controller=cluster.registry_url(), heartbeat_interval=1,
                                                    models=[SimModel(name="cli-model")])) for _ in range(2)])
    cluster.wait_for("cli-model", count=2, timeout=30)
    yield host, ports
    ray.get(host.stop_all.remote())
    ray.kill(host)
    result = run("stop", "--forget")
    assert result.exit_code == 0 and "stopped" in result.output
    with pytest.raises(ValueError):
        ray.get_actor("cli", namespace="tests")


def test_status_lists_instances_and_watchers(deployed):
    _, ports = deployed
    result = run("status", "--json")
    assert result.exit_code == 0
    st = json.loads(result.output)
    assert {r["port"] for r in st["instances"] if r["model"] == "cli-model"} == set(ports)
    assert st["watchers"][0]["source"] == "reg" and not st["watchers"][0]["stale"]
    table = CliRunner().invoke(cli, [*BASE, "status"], terminal_width=200)
    assert "cli-model" in table.output and "watchers" in table.output


def test_apply_prints_every_instance_and_exits_0(deployed):
    _, ports = deployed
    result = run("apply", "cli-model", "restart", "--json")
    assert result.exit_code == 0, result.output
    outs = json.loads(result.output)
    assert sorted(o["port"] for o in outs) == sorted(ports)
    assert all("start successfully" in o["message"] for o in outs)


def test_apply_exits_1_when_any_instance_failed(deployed):
    host, ports = deployed
    ray.get(host.set_faults.remote(ports[0], fail_next=1))
    result = run("apply", "cli-model", "start", "--json")
    assert result.exit_code == 1
    failed = [o for o in json.loads(result.output) if not o["success"]]
    assert [o["port"] for o in failed] == [ports[0]]


def test_params_are_typed_key_values(deployed):
    result = run("apply", "cli-model", "update_params", "--param", "temperature=0.5", "--param", "stream=true",
                 "--json")
    assert result.exit_code == 0
    assert "Update worker params and restart successfully" in result.output
    bad = run("apply", "cli-model", "update_params", "--param", "novalue")
    assert bad.exit_code == 2 and "key=value" in bad.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["apply", "ghost", "start"], "error: no registry lists any instance of ghost@llm"),
        (["apply", "cli-modle", "start"], "no registry lists any instance of cli-modle@llm; did you mean cli-model?"),
        (["apply", "cli-model", "start", "--worker-type", "text2vec"],
         "cli-model is listed as cli-model@llm: add --worker-type llm"),
        (["apply", "cli-model", "start", "--worker-type", "gpu"], "--worker-type"),
        (["startup", "--host", "127.0.0.1", "--port", "1", "--model", "m"],
         "error: no registry lists a worker manager at 127.0.0.1:1"),
        (["startup", "--host", "127.0.0.1", "--port", "70000", "--model", "m"], "--port: "),
    ],
)
def test_request_mistakes_are_one_line_with_exit_2(deployed, args, needle):
    result = CliRunner().invoke(cli, [*BASE, *args])
    assert result.exit_code == 2
    text = result.stderr
    assert needle in text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1


def test_starting_again_with_another_config_says_the_cli_commands(deployed, tmp_path):
    config = tmp_path / "other.yaml"
    config.write_text("registries:\n  - {kind: embedded, name: other, port: 0}\n")
    result = CliRunner().invoke(cli, [*BASE, "start", "--config", str(config)], terminal_width=300)
    line = result.stderr.replace("\n", " ")
    assert result.exit_code == 2, result.output
    assert "coordinator 'cli' is already running with another config (it differs in: registries" in line
    assert "'coordinator --name cli --namespace tests stop' first" in line and "attach()" not in line


def test_startup_shutdown_and_supports(deployed):
    _, ports = deployed
    where = ["--host", "127.0.0.1", "--port", str(ports[1]), "--model", "cli-extra"]
    assert run("startup", *where, "--param", "provider=proxy/openai").exit_code == 0
    supports = json.loads(run("supports", "--json").output)
    models = {(o["endpoint"][1], m["model"]) for o in supports for w in o["models"] for m in w["models"]}
    assert (ports[1], "cli-extra") in models and (ports[0], "cli-extra") not in models
    assert run("shutdown", *where).exit_code == 0


def test_a_ray_token_mismatch_is_one_line_saying_what_to_set(ray_session):
    """The session's Ray wants a token; a shell without RAY_AUTH_MODE=token is
    told so at once, not after twenty seconds of Ray's retries."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "coordinator", "--address", ray.get_runtime_context().gcs_address,
                           "status"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "wants a token" in lines[0] and "set RAY_AUTH_MODE=token" in lines[0]


def test_attaching_to_nothing_is_a_clear_error(ray_session):
    result = CliRunner().invoke(cli, ["--name", "absent", "--namespace", "tests", "status"])
    assert result.exit_code == 2
    assert "no coordinator named 'absent'" in result.output



def test_deploy_deployments_and_undeploy(deployed, tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("deployments:\n  - {model: cli-kept, replicas: 2, params: {provider: proxy/sim}}\n")
    plan = CliRunner().invoke(cli, [*BASE, "deploy", str(fleet), "--dry-run"], terminal_width=200)
    assert plan.exit_code == 0, plan.output
    assert plan.output.count("start") == 2 and "nothing sent" in plan.output
    done = run("deploy", str(fleet), "--wait", "--timeout", "30")
    assert done.exit_code == 0, done.output
    assert "deployed cli-kept@llm: 2 replicas (generation 1)" in done.output
    assert "cli-kept@llm: 2/2 ready, ready" in done.output  # its progress line, as it ended
    [st] = json.loads(run("deployments", "--json").output)
    assert (st["model"], st["ready"], st["state"]) == ("cli-kept", 2, "ready")

    host, port = st["instances"][0].rsplit(":", 1)
    stopped = CliRunner().invoke(
        cli, [*BASE, "shutdown", "--host", host, "--port", port, "--model", "cli-kept"])
    assert stopped.exit_code == 0, stopped.output
    assert "is deployed (2 replicas): the coordinator starts it again" in stopped.stderr

    gone = run("undeploy", "cli-kept", "--shutdown")
    assert gone.exit_code == 0 and "undeployed cli-kept@llm: its instances stopped" in gone.output
    assert json.loads(run("deployments", "--json").output) == []


def test_a_bad_fleet_file_is_one_line_naming_the_field(deployed, tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("deployments:\n  - {model: x, replicas: -2}\n")
    bad = CliRunner().invoke(cli, [*BASE, "deploy", str(fleet)])
    assert bad.exit_code == 2 and "replicas" in bad.stderr
    fleet.write_text("deployments:\n  - {model: x, replicas: 1}\n  - {model: x, replicas: 2}\n")
    bad = CliRunner().invoke(cli, [*BASE, "deploy", str(fleet)])
    assert bad.exit_code == 2 and "repeated: x@llm" in bad.stderr


def test_deploy_names_hosts_no_registry_lists_and_wait_says_why_it_gave_up(deployed, tmp_path):
    _, ports = deployed
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("deployments:\n  - {model: cli-pinned, replicas: 2, params: {provider: proxy/sim},"
                     f" hosts: ['127.0.0.1:{ports[0]}', '127.0.0.9:1']}}\n")
    plan = CliRunner().invoke(cli, [*BASE, "deploy", str(fleet), "--dry-run"], terminal_width=200)
    assert plan.exit_code == 0, plan.output
    assert plan.stderr.strip().splitlines() == [
        "note: cli-pinned@llm: hosts entry 127.0.0.9:1 is not a worker manager any registry lists"]
    assert json.loads(run("deployments", "--json").output) == []  # a dry run keeps nothing

    try:
        # One replica fits on the one listed manager among its hosts; the other has nowhere to go.
        waited = CliRunner().invoke(cli, [*BASE, "deploy", str(fleet), "--wait", "--timeout", "20"],
                                    terminal_width=300)
        assert waited.exit_code == 1, waited.output
        assert "not ready: " in waited.stderr
        assert "no other eligible worker manager among hosts 127.0.0.1:" in waited.stderr.replace("\n", " ")
    finally:
        assert run("undeploy", "cli-pinned", "--shutdown").exit_code == 0
