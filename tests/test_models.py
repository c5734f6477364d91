"""Wire models against the JSON shapes a real DB-GPT 0.8.2 sends (docs/protocol.md)."""

from __future__ import annotations

import json
from types import ModuleType

import pytest
from pydantic import ValidationError

import coordinator
from coordinator.core.models import (
    ApplyResult,
    ModelInstance,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
    WorkerSupportedModel,
    parse_worker_key,
)

CONTROLLER_INSTANCE = """{"model_name": "chatgpt-test@llm", "host": "127.0.0.1", "port": 18001,
 "weight": 1.0, "check_healthy": true, "healthy": true, "enabled": true,
 "prompt_template": null, "last_heartbeat": "2026-11-28T07:48:08.884705",
 "remove_from_registry": false}"""

APPLY_OUTPUT = """{"message": "model chatgpt-test@proxy/openai(127.0.0.1:18001) start successfully",
 "success": true, "timecost": 0.0936}"""

STARTUP_REQUEST = """{"host": "127.0.0.1", "port": 18001, "model": "second-model",
 "worker_type": "llm", "params": {"name": "second-model", "provider": "proxy/openai",
 "api_base": "http://127.0.0.1:9/v1", "api_key": "k"}, "delete_after": false,
 "worker_name": null, "sys_code": null, "user_name": null}"""

SUPPORTS = """[{"host": "127.0.0.1", "port": 18001, "models": [{"model": "chatgpt-test",
 "worker_type": "llm", "provider": "proxy/openai", "path": null, "path_exist": false,
 "proxy": true, "enabled": true, "params": [{"param_name": "api_base"}], "description": null}]}]"""


@pytest.mark.parametrize(
    ("model", "raw"),
    [
        (ModelInstance, CONTROLLER_INSTANCE),
        (WorkerApplyOutput, APPLY_OUTPUT),
        (WorkerStartupRequest, STARTUP_REQUEST),
    ],
)
def test_dbgpt_json_round_trips_unchanged(model, raw):
    parsed = model.model_validate_json(raw)
    dumped = parsed.model_dump(mode="json", exclude={"host", "port"} if model is WorkerApplyOutput else None)
    assert dumped == json.loads(raw)


def test_apply_request_serialises_as_dbgpt_sends_it():
    req = WorkerApplyRequest(model="chatgpt-test", apply_type="restart")
    assert req.model_dump(mode="json") == {
        "model": "chatgpt-test", "apply_type": "restart", "worker_type": "llm",
        "params": {}, "apply_user": None,
    }
    assert req.key == "chatgpt-test@llm"


def test_apply_request_refuses_null_params_as_dbgpt_does():
    # DB-GPT 0.8.2 answers {"params": null} with 422; we must never send it.
    with pytest.raises(ValidationError) as info:
        WorkerApplyRequest.model_validate({"model": "m", "apply_type": "start", "params": None})
    assert info.value.errors()[0]["loc"] == ("params",)


def test_supported_models_parse_with_parameter_descriptions():
    [wsm] = [WorkerSupportedModel.model_validate(x) for x in json.loads(SUPPORTS)]
    assert wsm.models[0].provider == "proxy/openai"
    assert wsm.models[0].params == [{"param_name": "api_base"}]


def test_fields_a_newer_dbgpt_adds_are_ignored():
    inst = ModelInstance.model_validate({**json.loads(CONTROLLER_INSTANCE), "zone": "b"})
    assert inst.model_name == "chatgpt-test@llm"


def test_reduce_follows_dbgpt_and_all_outcomes_count():
    outs = [
        WorkerApplyOutput(message="a", success=True, timecost=0.5),
        WorkerApplyOutput(message="b", success=False, timecost=2.0),
        WorkerApplyOutput(message="c", success=True, timecost=1.0),
    ]
    combined = WorkerApplyOutput.reduce(outs)
    assert combined.message == "a\n;b\n;c"
    assert combined.success is False
    assert combined.timecost == 2.0
    assert WorkerApplyOutput.reduce(outs[::2]).success is True


def test_reduce_of_nothing_is_dbgpts_not_outputs():
    assert WorkerApplyOutput.reduce([]).message == "Not outputs"


def test_apply_result_keeps_every_output():
    outs = [WorkerApplyOutput(message=str(i), success=i != 1, host="h", port=i + 1) for i in range(3)]
    result = ApplyResult.of(outs)
    assert len(result.outputs) == 3
    assert [o.port for o in result.failed] == [2]
    assert not result.success


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"model": "m", "apply_type": "reboot"}, "apply_type"),
        ({"model": "", "apply_type": "start"}, "model"),
        ({"model": "m", "apply_type": "start", "worker_type": "gpu"}, "worker_type"),
        ({"model": "m", "apply_type": "start", "params": [1]}, "params"),
    ],
)
def test_bad_apply_request_names_the_field(fields, bad_field):
    with pytest.raises(ValidationError) as info:
        WorkerApplyRequest(**fields)
    assert info.value.errors()[0]["loc"][0] == bad_field


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_startup_request_rejects_impossible_ports(port):
    with pytest.raises(ValidationError):
        WorkerStartupRequest(host="h", port=port, model="m", worker_type="llm")


def test_worker_keys_split_at_the_last_at_sign():
    assert parse_worker_key("org@model@llm") == ("org@model", "llm")
    with pytest.raises(ValueError):
        parse_worker_key("no-type")


def test_public_names_are_exactly_the_documented_ones():
    expected = {
        "ApplyPlan", "ApplyResult", "ApplyType", "RolloutProgress", "AsyncCluster", "BackoffSettings", "Cluster", "ClusterStatus",
        "CoordinatorConfig", "CoordinatorError", "CoordinatorNotFoundError",
        "CoordinatorUnavailableError", "DbgptSource", "EmbeddedSource", "Endpoint", "InstanceStatus",
        "ModelBusyError", "ModelInstance", "NoInstancesError", "ProbeSettings", "RayWorkerManager", "StaticSource",
        "SupportedModel", "SupportsOutcome", "Timeouts", "UnknownEndpointError", "WaitTimeoutError",
        "WatcherStatus", "WorkerApplyOutput", "WorkerApplyRequest", "WorkerOperationError",
        "WorkerStartupRequest", "WorkerSupportedModel", "WorkerType", "attach", "load_config", "start", "stop",
        "Deployment", "DeploymentEvent", "DeploymentNotReadyError", "DeploymentStatus", "NotDeployedError",
        "ReconcileSettings", "DrainSettings", "Autoscale", "InferenceError", "OverloadedError", "ModelMetadata", "ModelOutput", "ParameterDescription",
    }
    assert sorted(coordinator.__all__) == sorted(expected)  # each once
    # What the package serves is exactly that: no undocumented name besides
    # submodules, no documented one missing.
    served = {n for n in dir(coordinator)
              if not n.startswith("_") and not isinstance(getattr(coordinator, n), ModuleType)}
    assert served == expected
    star: dict = {}
    exec("from coordinator import *", star)
    assert set(star) - {"__builtins__"} == expected
    for name in expected:
        value = getattr(coordinator, name)
        # The name is the object's own, defined in this package: not another
        # object filed under it, nor a third-party one passed through.
        assert value.__name__ == name, (name, value)
        assert value.__module__.startswith("coordinator."), (name, value.__module__)


@pytest.mark.parametrize(
    "error",
    [
        coordinator.NoInstancesError("m@llm"),
        coordinator.UnknownEndpointError("h", 1),
        coordinator.CoordinatorNotFoundError("n", "ns"),
        coordinator.CoordinatorUnavailableError("gone"),
        coordinator.WaitTimeoutError("late"),
        coordinator.ModelBusyError("m@llm", 32),
        coordinator.WorkerOperationError(WorkerApplyOutput(message="boom", success=False)),
    ],
)
def test_errors_survive_the_trip_from_the_coordinator_to_the_driver(error):
    import pickle

    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)


def test_an_actor_importing_one_module_does_not_load_the_driver_api():
    """The package's public names load on first use: a proxy process, which
    needs the config and wire models, does not import the client or the CLI."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys, actors.proxy, actors.watcher, actors.registry; "
            "print(sorted(m for m in ('coordinator.driver.client', 'coordinator.driver.cli', 'coordinator.driver.worker_manager') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
