"""``coordinator deploy`` against a fake cluster (no Ray): what --wait shows
while it waits and when it gives up, and the --dry-run note about hosts no
registry lists."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from coordinator.driver import cli as cli_module
from coordinator.driver.cli import cli, wait_verdict
from coordinator.core.config import Timeouts
from coordinator.core.deployments import Action, Decision, DeploymentStatus
from coordinator.core.models import Endpoint, ModelInstance


def status(model: str = "embed-small", state: str = "progressing", ready: int = 0, replicas: int = 2,
           generation: int = 1, observed: int = 1, stuck: bool = False, last_error: str | None = None):
    return DeploymentStatus(model=model, worker_type="text2vec", replicas=replicas, ready=ready,
                            instances=[f"127.0.0.1:{8000 + i}" for i in range(ready)], state=state,
                            last_error=last_error, generation=generation, observed_generation=observed, stuck=stuck)


class FakeCluster:
    """What the deploy command calls; ``rounds`` are the successive answers of
    deployments(), the last one repeated (at most ``polls`` times in all)."""

    def __init__(self, rounds: list[list[DeploymentStatus]], managers: list[tuple[str, int]] = (), polls: int = 50):
        self.rounds, self.polls, self.calls = rounds, polls, 0
        self.managers = [ModelInstance(model_name="WorkerManager@service", host=h, port=p, healthy=False)
                         for h, p in managers]
        self.config = SimpleNamespace(timeouts=Timeouts())
        self.deployed: list = []

    def instances(self, model=None, worker_type=None, healthy_only=True):
        assert (model, worker_type, healthy_only) == ("WorkerManager", "service", False)
        return self.managers

    def plan(self, *specs):
        return [(s.key, Decision([Action("start", Endpoint("127.0.0.1", 8000), "0 of 2 ready")], "progressing",
                                 "0 of 2 ready")) for s in specs]

    def deploy(self, *specs, wait=False, timeout=None):
        assert not wait, "the CLI waits itself, showing progress"
        self.deployed.extend(specs)
        return [1 for _ in specs]

    def deployments(self):
        self.calls += 1
        assert self.calls <= self.polls, "still polling after the outcome was clear"
        return self.rounds[min(self.calls, len(self.rounds)) - 1]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setattr(cli_module, "WAIT_POLL", 0.01)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("deployments:\n  - {model: embed-small, worker_type: text2vec, replicas: 2,"
                     " hosts: ['127.0.0.1:8000', '10.0.0.9:8001']}\n")

    def run(cluster: FakeCluster, *args: str):
        monkeypatch.setattr(cli_module.Context, "cluster", lambda self: cluster)
        return CliRunner().invoke(cli, ["deploy", str(fleet), *args], terminal_width=200)

    return run


def test_wait_shows_progress_per_deployment_until_ready(fake):
    cluster = FakeCluster([[status(observed=0)], [status(ready=1)], [status(state="ready", ready=2)]])
    result = fake(cluster, "--wait", "--timeout", "60")
    assert result.exit_code == 0, result.output
    assert "embed-small@text2vec: 2/2 ready, ready" in result.output
    assert cluster.calls == 3


def test_wait_fails_at_once_with_the_reason_when_a_deployment_is_stuck(fake):
    why = "1 of 2 ready; no other eligible worker manager among hosts 10.0.0.9:8001, 127.0.0.1:8000"
    cluster = FakeCluster([[status(ready=1)], [status(state="degraded", ready=1, stuck=True, last_error=why)]],
                          managers=[("127.0.0.1", 8000)], polls=2)
    result = fake(cluster, "--wait", "--timeout", "600")
    assert result.exit_code == 1
    assert f"embed-small@text2vec is stuck: {why}" in result.stderr.replace("\n", " ")


def test_wait_gives_up_after_its_timeout_naming_what_is_late(fake):
    cluster = FakeCluster([[status(ready=1, last_error="1 of 2 ready")]], polls=10_000)
    result = fake(cluster, "--wait", "--timeout", "0.2")
    assert result.exit_code == 1
    assert "after 0.2 s: embed-small@text2vec: 1/2 ready, progressing — 1 of 2 ready" in result.stderr


@pytest.mark.parametrize(
    ("found", "wanted", "verdict"),
    [
        ([status(state="ready", ready=2)], {"embed-small@text2vec": 1}, (True, None)),
        # ready, but at the generation before: not yet
        ([status(state="ready", ready=2, generation=2, observed=1)], {"embed-small@text2vec": 2}, (False, None)),
        # stuck in a round of the generation before: the new one may place it
        ([status(stuck=True, generation=2, observed=1)], {"embed-small@text2vec": 2}, (False, None)),
        ([status(stuck=True, last_error="no other eligible worker manager")], {"embed-small@text2vec": 1},
         (False, "embed-small@text2vec is stuck: no other eligible worker manager")),
        ([], {"embed-small@text2vec": 1}, (False, "embed-small@text2vec is no longer deployed")),
    ],
)
def test_wait_verdict(found, wanted, verdict):
    assert wait_verdict(found, wanted) == verdict


def test_dry_run_names_a_hosts_entry_no_registry_lists(fake):
    cluster = FakeCluster([], managers=[("127.0.0.1", 8000)])
    result = fake(cluster, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        "note: embed-small@text2vec: hosts entry 10.0.0.9:8001 is not a worker manager any registry lists"]
    assert "nothing sent" in result.output and cluster.deployed == []


def test_the_help_says_how_long_wait_waits_by_default():
    result = CliRunner().invoke(cli, ["deploy", "--help"], terminal_width=200)
    assert "default: the coordinator's timeouts.startup, 900 s" in result.output
