"""What the command line prints, without Ray: tables at 80 and 200 columns,
``status --watch``, and input mistakes said in the user's terms — one line,
exit 2, before anything connects to Ray."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner
from rich.console import Console

from coordinator.core.deployments import DeploymentStatus
from coordinator.core.errors import NoInstancesError
from coordinator.core.models import ModelInstance, WorkerApplyOutput
from coordinator.core.status import ClusterStatus, InstanceStatus, WatcherStatus
from coordinator.driver import cli as cli_module
from coordinator.driver import preflight, tables
from coordinator.driver.cli import cli, status_view
from coordinator.driver.messages import model_hint, plural, worker_facing_url
from coordinator.driver.tables import Col
from tests.conftest import free_port

TARGET = "ray actor 'dbgpt-coordinator/registry/fleet' (http://127.0.0.1:18000)"


def fleet_status() -> ClusterStatus:
    ports = (18101, 18102, 18103, 18104)
    instances = [
        InstanceStatus(model=model, worker_type=wt, host="127.0.0.1", port=port, registry_healthy=True,
                       reachable=port != 18104, probe_error="Connection refused" if port == 18104 else None,
                       last_heartbeat=datetime(2026, 11, 30, 15, 7, 4))
        for model, wt in (("WorkerManager", "service"), ("chatgpt-test", "llm")) for port in ports]
    watcher = WatcherStatus(source="fleet", kind="embedded", target=TARGET, version=4, instances=8, ready=True)
    return ClusterStatus(name="dbgpt-coordinator", namespace="n", instances=instances, watchers=[watcher],
                         proxies=4, busy_keys=[])


def text(parts, width: int) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    for part in parts:
        console.print(part)
    return console.export_text()


def test_status_at_80_columns_keeps_every_address_and_reason_whole_and_drops_the_heartbeat():
    out = text(status_view(fleet_status(), 80), 80)
    assert max(len(line) for line in out.splitlines()) <= 80
    for port in (18101, 18102, 18103, 18104):
        assert out.count(f"127.0.0.1:{port}") == 2  # each worker manager and its model, told apart
    assert "…" not in out
    assert "Connection refused" in out.replace("\n│", " ")  # the probe's reason, maybe wrapped, never cut
    assert "last heartbeat" not in out and "15:07:04" not in out
    # the watcher's target: two whole lines, not four pieces
    assert "ray actor 'dbgpt-coordinator/registry/fleet'" in out and "(http://127.0.0.1:18000)" in out
    assert "version" not in out  # lowest priority
    assert "last error" not in out  # empty: takes no room


def test_status_at_200_columns_shows_every_column_on_one_line_each():
    out = text(status_view(fleet_status(), 200), 200)
    for header in ("model", "type", "worker", "registry", "probe", "in flight", "last heartbeat"):
        assert header in out
    assert "unreachable Connection refused" in out and "15:07:04" in out
    assert "kind" in out and "version" in out


def test_wide_shows_even_empty_and_low_priority_columns_at_80():
    out = text(status_view(fleet_status(), 80, wide=True), 200)
    assert "last heartbeat" in out and "last error" in out and "refused" in out


def test_layout_drops_the_lowest_priority_first_and_never_a_kept_column():
    cols = [Col("address", keep=True), Col("a", 2), Col("b", 1), Col("why", keep=True, fold=True)]
    rows = [["10.0.0.1:18001", "x" * 20, "y" * 20, "a long reason " * 6]]
    assert tables.layout(cols, rows, 200) == [0, 1, 2, 3]
    assert tables.layout(cols, rows, 70) == [0, 1, 3]
    assert tables.layout(cols, rows, 20) == [0, 3]  # too narrow for even these: still kept
    assert tables.layout(cols, rows, 20, wide=True) == [0, 1, 2, 3]


def test_a_title_wider_than_its_table_is_a_line_above_it():
    title = "plan: restart chatgpt-test@llm, 4 instances (nothing sent)"
    rows = [["1", "127.0.0.1:18101"]]
    parts = tables.render(title, [Col("batch", keep=True), Col("instances", keep=True)], rows, 80)
    out = text(parts, 80)
    assert title in out.splitlines()[0]


def deployment(**over) -> DeploymentStatus:
    fields = dict(model="embed-small", worker_type="text2vec", replicas=1, ready=1, instances=["127.0.0.1:18101"],
                  state="ready", generation=1, observed_generation=1)
    return DeploymentStatus(**{**fields, **over})


class FakeCluster:
    def __init__(self, statuses=(), found=(), listed=(), apply_error=None):
        self.statuses, self.found, self.listed, self.apply_error = list(statuses), list(found), listed, apply_error
        self.status_calls = 0

    def status(self):
        self.status_calls += 1
        item = self.statuses[min(self.status_calls, len(self.statuses)) - 1]
        if isinstance(item, BaseException):
            raise item
        return item

    def deployments(self):
        return self.found

    def instances(self, model=None, worker_type=None, healthy_only=True):
        return [ModelInstance(model_name=key, host="127.0.0.1", port=18101) for key in self.listed]

    def apply(self, model, apply_type, **kwargs):
        raise self.apply_error


@pytest.fixture
def run(monkeypatch):
    """The CLI at a given width against a fake cluster; connecting to Ray fails the test."""
    monkeypatch.setattr(cli_module.Context, "connect", lambda self: pytest.fail("connected to Ray"))

    def invoke(*args: str, cluster: FakeCluster | None = None, columns: int = 80):
        if cluster is not None:
            monkeypatch.setattr(cli_module.Context, "cluster", lambda self: cluster)
        return CliRunner().invoke(cli, list(args), env={"COLUMNS": str(columns)})

    return invoke


def test_deployments_at_80_columns_keep_the_key_whole_and_leave_out_an_empty_last_error(run):
    found = [deployment(), deployment(model="qwen-72b-chat-int4", worker_type="llm", replicas=3, ready=2,
                                      instances=["10.0.0.7:18001", "10.0.0.8:18001"], state="progressing")]
    result = run("deployments", cluster=FakeCluster(found=found))
    assert result.exit_code == 0, result.output
    assert "embed-small@text2vec" in result.output and "qwen-72b-chat-int4@llm" in result.output
    assert "last error" not in result.output and "…" not in result.output
    wide = run("deployments", "--wide", cluster=FakeCluster(found=found), columns=200)
    assert "last error" in wide.output


def test_no_deployments_says_so(run):
    result = run("deployments", cluster=FakeCluster(found=[]))
    assert result.exit_code == 0 and "no deployments" in result.output


def test_status_at_80_and_200_columns_through_the_command(run):
    narrow = run("status", cluster=FakeCluster(statuses=[fleet_status()]))
    assert narrow.exit_code == 0, narrow.output
    assert max(len(line) for line in narrow.output.splitlines()) <= 80
    assert "127.0.0.1:18104" in narrow.output and "last heartbeat" not in narrow.output
    wide = run("status", cluster=FakeCluster(statuses=[fleet_status()]), columns=200)
    assert "last heartbeat" in wide.output and "unreachable Connection refused" in wide.output


def test_status_watch_refreshes_until_its_count(run, monkeypatch):
    monkeypatch.setattr(cli_module.time, "sleep", lambda s: None)
    cluster = FakeCluster(statuses=[fleet_status()])
    result = run("status", "--watch", "--interval", "0.1", "--count", "3", cluster=cluster)
    assert result.exit_code == 0, result.output
    assert cluster.status_calls == 3
    assert "127.0.0.1:18104" in result.output and "Ctrl-C to stop" in result.output


def test_status_watch_ends_quietly_on_ctrl_c(run, monkeypatch):
    monkeypatch.setattr(cli_module.time, "sleep", lambda s: None)
    cluster = FakeCluster(statuses=[fleet_status(), fleet_status(), KeyboardInterrupt()])
    result = run("status", "--watch", cluster=cluster)
    assert result.exit_code == 0, result.output
    assert cluster.status_calls == 3 and "Traceback" not in result.output


def one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_mis_indented_fleet_file_is_one_line_with_file_line_and_column(run, tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("deployments:\n  - model: embed-small\n   replicas: 2\n")
    line = one_line(run("deploy", str(fleet)))
    assert f"{fleet}:3:4: not valid YAML" in line and "<unicode string>" not in line


def test_a_config_with_an_unclosed_list_is_one_line_with_file_line_and_column(run, tmp_path):
    config = tmp_path / "coordinator.yaml"
    config.write_text("registries:\n  - {kind: dbgpt, urls: [http://10.0.0.5:8000}\n")
    line = one_line(run("start", "--config", str(config)))
    assert line.startswith(f"error: {config}:2:") and "not valid YAML" in line


def test_fleet_validation_names_the_file_and_the_model_before_connecting(run, tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("deployments:\n  - {model: embed-small, replicas: 1}\n  - {model: qwen, replicas: -2}\n")
    line = one_line(run("deploy", str(fleet)))
    assert f"{fleet}: deployment 2 (qwen): replicas: Input should be greater than or equal to 0" in line
    assert "0.replicas" not in line and "1.replicas" not in line


def test_config_validation_names_the_file_and_the_field(run, tmp_path):
    config = tmp_path / "coordinator.yaml"
    config.write_text("registries:\n  - {kind: embedded, port: 70000}\n")
    line = one_line(run("start", "--config", str(config)))
    assert f"{config}: registries, entry 1" in line and "port" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["startup", "--host", "127.0.0.1", "--port", "70000", "--model", "m"], "--port: "),
        (["startup", "--host", "bad host!", "--port", "1", "--model", "m"], "--host: "),
        (["apply", "m", "restart", "--max-unavailable", "0"], "--max-unavailable"),
        (["apply", "m", "restart", "--worker-type", "gpu"], "--worker-type"),
    ],
)
def test_bad_options_are_refused_before_connecting_to_ray(run, args, needle):
    result = run(*args)
    assert result.exit_code == 2
    assert needle in result.stderr and "req." not in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_model_names_the_worker_types_it_is_listed_under(run):
    cluster = FakeCluster(listed=["embed-small@text2vec", "WorkerManager@service"],
                          apply_error=NoInstancesError("embed-small@llm"))
    line = one_line(run("apply", "embed-small", "restart", cluster=cluster))
    assert "no registry lists any instance of embed-small@llm" in line
    assert "embed-small is listed as embed-small@text2vec: add --worker-type text2vec" in line


def test_a_typo_gets_a_did_you_mean(run):
    cluster = FakeCluster(listed=["chatgpt-test@llm"], apply_error=NoInstancesError("chatgpt-tset@llm"))
    line = one_line(run("apply", "chatgpt-tset", "restart", cluster=cluster))
    assert "did you mean chatgpt-test?" in line


def test_model_hint():
    listed = ["embed-small@text2vec", "embed-small@reranker", "qwen@llm", "WorkerManager@service"]
    assert model_hint("embed-small", "llm", listed) == (
        "embed-small is listed as embed-small@reranker and embed-small@text2vec: add --worker-type reranker")
    assert model_hint("qwne", "llm", listed) == "did you mean qwen?"
    assert model_hint("WorkerManage", "llm", listed) is None  # never suggested as a model
    assert model_hint("something-else", "llm", listed) is None


def test_plural():
    assert [plural(n, "replica") for n in (0, 1, 2)] == ["0 replicas", "1 replica", "2 replicas"]


def test_outputs_table_keeps_workers_and_messages_whole_at_80(run):
    outs = [WorkerApplyOutput(host="127.0.0.1", port=18100 + i, success=True, timecost=1.5,
                              message=f"model chatgpt-test@proxy/openai(127.0.0.1:{18100 + i}) start successfully")
            for i in range(3)]
    out = text(tables.render("restart chatgpt-test@llm", cli_module.OUTPUT_COLUMNS,
                             cli_module.outputs_rows(outs), 80), 80)
    assert "127.0.0.1:18102 " in out and "…" not in out
    assert "seconds" not in out  # a detail: gone before the message wraps


@pytest.mark.parametrize(
    ("url", "ip", "want"),
    [
        ("http://0.0.0.0:8000", "10.0.0.5", "http://10.0.0.5:8000"),
        ("http://127.0.0.1:8000", "10.0.0.5", "http://127.0.0.1:8000"),
        ("https://[::]:8000", "fd00::5", "https://[fd00::5]:8000"),
        ("http://0.0.0.0:8000", None, "http://0.0.0.0:8000"),
    ],
)
def test_the_registry_address_given_to_workers(url, ip, want):
    assert worker_facing_url(url, ip) == want


@pytest.mark.parametrize(
    ("code", "mode", "needle"),
    [
        ("UNAUTHENTICATED", "disabled", "set RAY_AUTH_MODE=token, with the head's token"),
        ("UNAUTHENTICATED", "", "this shell has RAY_AUTH_MODE=unset"),
        ("UNAUTHENTICATED", "token", "refuses this shell's token: use the head's token"),
        ("UNAVAILABLE", "token", "no Ray cluster answers at 10.0.0.5:6379: start one with 'ray start --head'"),
    ],
)
def test_what_to_say_when_the_ray_cluster_will_not_take_us(code, mode, needle):
    assert needle in preflight.advice(code, "10.0.0.5:6379", mode)


def test_a_cluster_that_answers_needs_no_advice():
    assert preflight.advice("OK", "10.0.0.5:6379", "disabled") is None
    assert preflight.advice("INTERNAL", "10.0.0.5:6379", "token") is None  # ray.init says it its own way


def test_nothing_listening_is_one_line_at_once(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process, whatever ran before
    result = CliRunner().invoke(cli, ["--address", f"127.0.0.1:{free_port()}", "status"])
    line = one_line(result)
    assert "no Ray cluster answers at 127.0.0.1:" in line and "ray start --head" in line


def test_deployment_event_times_are_iso_in_json_like_every_other_time(run):
    from coordinator.core.deployments import DeploymentEvent

    event = DeploymentEvent(at=datetime(2026, 11, 30, 15, 7, 4, tzinfo=UTC).timestamp(), action="start",
                            endpoint="127.0.0.1:18101", reason="0 of 1 ready", ok=True)
    result = run("deployments", "--json", cluster=FakeCluster(found=[deployment(events=[event])]))
    [found] = json.loads(result.output)
    assert found["events"][0]["at"] == "2026-11-30T15:07:04+00:00"
    assert DeploymentStatus.model_validate(found).events == [event]  # and read back


def test_status_with_no_instances_says_none():
    st = fleet_status().model_copy(update={"instances": []})
    out = text(status_view(st, 80), 80)
    assert "instances (dbgpt-coordinator): none yet" in out and "watchers" in out


def test_from_file_says_where_the_yaml_breaks(tmp_path):
    from coordinator.core.config import CoordinatorConfig
    from coordinator.core.errors import ConfigFileError

    config = tmp_path / "coordinator.yaml"
    config.write_text("registries:\n  - kind: embedded\n   port: 8000\n")
    with pytest.raises(ConfigFileError, match=rf"^{config}:3:4: not valid YAML: .*starts at line 2, column 3"):
        CoordinatorConfig.from_file(config)


def test_a_request_validated_inside_a_call_still_names_the_option():
    from pydantic import ValidationError, validate_call

    from coordinator.core.models import WorkerStartupRequest
    from coordinator.driver.messages import option_problems

    @validate_call
    def lifecycle(*, req: WorkerStartupRequest) -> None: ...

    with pytest.raises(ValidationError) as caught:
        lifecycle(req={"host": "h", "port": 70000, "model": "m", "worker_type": "llm"})
    assert option_problems(caught.value, cli_module._OPTIONS) == ["--port: must be between 1 and 65535, not 70000"]


def test_status_wide_at_80_columns_shows_every_column_uncut(run):
    result = run("status", "--wide", cluster=FakeCluster(statuses=[fleet_status()]))
    assert result.exit_code == 0, result.output
    assert "last heartbeat" in result.output and "unreachable Connection refused" in result.output
    assert "…" not in result.output


def test_no_ray_on_this_machine_says_how_to_start_one(monkeypatch):
    import ray
    import ray._private.services as services

    def nothing_running(address, temp_dir=None):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", nothing_running)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    line = one_line(CliRunner().invoke(cli, ["status"]))
    assert "no Ray cluster is running on this machine: start one with 'ray start --head'" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["config", "--set", "gateway.port=["], "gateway.port: '[' is not a YAML value"),
        (["apply", "m", "restart", "--param", "x=["], "the value is not YAML"),
    ],
)
def test_a_value_that_is_not_yaml_is_one_line_before_connecting(run, args, needle):
    result = run(*args)
    assert result.exit_code == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_serve_checks_its_config_before_connecting_and_names_the_file(run, tmp_path):
    config = tmp_path / "gw.yaml"
    config.write_text("gateway:\n  port: notaport\n")
    line = one_line(run("serve", "--config", str(config)))
    assert f"{config}: gateway: port" in line and "--port" not in line


def test_a_typo_in_a_coordinator_variable_is_one_line(monkeypatch):
    monkeypatch.setenv("COORDINATOR_GATEWAY_PORT", "8200")  # one underscore: sets nothing
    result = CliRunner().invoke(cli, ["config"])
    assert result.exit_code == 2 and "COORDINATOR_GATEWAY_PORT" in result.stderr
    assert "ValueError" not in result.stderr and "Traceback" not in result.stderr


def test_token_mode_with_no_token_says_so_in_one_line(monkeypatch):
    from ray._private import gcs_utils

    class AuthenticationError(Exception):  # what Ray's client raises when it has no token to send
        pass

    def no_token(address):
        raise AuthenticationError("no token")

    monkeypatch.setattr(gcs_utils, "create_gcs_channel", no_token)
    said = preflight.check(f"127.0.0.1:{free_port()}")
    assert said is not None and "no token" in said and "RAY_AUTH_TOKEN" in said
