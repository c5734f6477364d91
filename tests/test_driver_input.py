"""Property tests over the driver's public API: whatever a caller passes, either
it validates and exactly one call reaches the coordinator, or
``pydantic.ValidationError`` names the argument (or the field inside it) and
nothing is sent. No other exception. A fake coordinator handle records what is
sent, so no Ray is needed."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coordinator import Cluster, CoordinatorConfig
from coordinator.core.models import ApplyResult, WorkerApplyOutput, WorkerApplyRequest, WorkerStartupRequest

CONFIG = CoordinatorConfig(registries=[{"kind": "static", "instances": []}])
ANSWERS: dict[str, Any] = {
    "get_config": CONFIG,
    "apply": ApplyResult.of([WorkerApplyOutput(message="ok")]),
    "startup": WorkerApplyOutput(message="ok"),
    "shutdown": WorkerApplyOutput(message="ok"),
    "instances": [], "wait_for": [], "supports": [],
}


class FakeCoordinator:
    """Stands in for the coordinator actor's handle; records every call."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple]] = []

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)

        def remote(*args: Any) -> asyncio.Future:
            if method != "get_config":
                self.sent.append((method, args))
            future = asyncio.get_running_loop().create_future()
            future.set_result(ANSWERS[method])
            return future

        return SimpleNamespace(remote=remote)


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly valid values, often junk."""
    return st.one_of(valid, valid, JUNK)


HOSTS = st.sampled_from(["10.0.0.7", "gpu-01", "::1", "evil.com/x?", "user@host", "", "h:1"])
STARTUP = st.fixed_dictionaries(
    {"host": maybe(HOSTS), "port": maybe(st.integers(1, 65535)), "model": maybe(st.text(min_size=1, max_size=20)),
     "worker_type": maybe(st.sampled_from(["llm", "text2vec", "reranker", "service"]))},
    optional={"params": maybe(st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)),
              "delete_after": maybe(st.booleans())},
)
CALLS = {
    "apply": st.fixed_dictionaries(
        {"model": maybe(st.text(min_size=1, max_size=20)),
         "apply_type": maybe(st.sampled_from(["start", "stop", "restart", "update_params"]))},
        optional={"worker_type": maybe(st.sampled_from(["llm", "text2vec"])),
                  "params": maybe(st.none() | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)),
                  "timeout": maybe(st.floats(0.1, 100)), "max_unavailable": maybe(st.integers(1, 5)),
                  "dry_run": maybe(st.booleans()), "health_timeout": maybe(st.floats(0.1, 100))},
    ),
    "startup": st.fixed_dictionaries({"req": STARTUP | JUNK}, optional={"timeout": maybe(st.floats(0.1, 100))}),
    "shutdown": st.fixed_dictionaries({"req": STARTUP | JUNK}, optional={"timeout": maybe(st.floats(0.1, 100))}),
    "instances": st.fixed_dictionaries(
        {}, optional={"model": maybe(st.none() | st.text(min_size=1, max_size=20)),
                      "worker_type": maybe(st.none() | st.just("llm")), "healthy_only": maybe(st.booleans())}),
    "wait_for": st.fixed_dictionaries(
        {"model": maybe(st.text(min_size=1, max_size=20))},
        optional={"count": maybe(st.integers(0, 5)), "worker_type": maybe(st.just("llm")),
                  "timeout": maybe(st.floats(0.1, 100))}),
    "supported_models": st.fixed_dictionaries({}, optional={"timeout": maybe(st.floats(0.1, 100))}),
}


@settings(max_examples=400, deadline=None)
@given(data=st.data(), method=st.sampled_from(sorted(CALLS)))
def test_every_call_validates_and_sends_once_or_names_the_bad_argument(data, method):
    kwargs = data.draw(CALLS[method], label="kwargs")
    coordinator = FakeCoordinator()
    cluster = Cluster("fake", "tests", coordinator)
    parameters = set(inspect.signature(getattr(cluster.aio, method)).parameters)
    try:
        asyncio.run(getattr(cluster.aio, method)(**kwargs))
    except ValidationError as exc:
        assert coordinator.sent == [], "something was sent although the input was refused"
        for error in exc.errors():
            assert error["loc"] and error["loc"][0] in parameters | {"model", "apply_type", "params"}, error
        return
    [(sent_method, args)] = coordinator.sent
    if method == "apply":
        req = args[0]
        assert isinstance(req, WorkerApplyRequest) and isinstance(req.params, dict)  # never null on the wire
    if method in ("startup", "shutdown"):
        assert isinstance(args[0], WorkerStartupRequest)


def test_the_blocking_face_refuses_bad_input_before_touching_the_coordinator():
    coordinator = FakeCoordinator()
    cluster = Cluster("fake", "tests", coordinator)
    with pytest.raises(ValidationError) as info:
        cluster.apply("chatgpt-test", "reboot")
    assert info.value.errors()[0]["loc"] == ("apply_type",)
    with pytest.raises(ValidationError) as info:
        cluster.startup({"host": "evil.com/x?", "port": 1, "model": "m", "worker_type": "llm"})
    assert info.value.errors()[0]["loc"] == ("req", "host")
    with pytest.raises(ValidationError) as info:
        cluster.wait_for("m", count=-1)
    assert info.value.errors()[0]["loc"] == ("count",)
    assert coordinator.sent == []


SOURCE = st.one_of(
    st.fixed_dictionaries({"kind": st.just("embedded")}, optional={
        "port": maybe(st.integers(0, 65535)), "host": maybe(HOSTS), "heartbeat_interval": maybe(st.floats(0.1, 10)),
        "heartbeat_timeout": maybe(st.floats(0.1, 100)), "name": maybe(st.text(max_size=10)),
        "max_body_bytes": maybe(st.integers(0, 10**6)), "token": JUNK}),
    st.fixed_dictionaries({"kind": st.just("dbgpt")}, optional={
        "url": maybe(st.sampled_from(["http://10.0.0.5:8000", "ftp://x", "not a url"])),
        "urls": maybe(st.lists(st.sampled_from(["http://a:1", "b"]), max_size=2)),
        "poll_interval": maybe(st.floats(-1, 10)), "workers": JUNK}),
    st.fixed_dictionaries({"kind": st.just("static")}, optional={
        "instances": maybe(st.lists(st.fixed_dictionaries(
            {"model_name": maybe(st.just("m@llm")), "host": maybe(HOSTS), "port": maybe(st.integers(1, 65535))}),
            max_size=2)),
        "path": JUNK}),
    JUNK,
)
CONFIGS = st.fixed_dictionaries(
    {"registries": maybe(st.lists(SOURCE, max_size=3))},
    optional={"timeouts": maybe(st.fixed_dictionaries({}, optional={"apply": maybe(st.floats(-1, 100))})),
              "headers": maybe(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2)),
              "worker_overrides": maybe(st.dictionaries(st.sampled_from(["10.0.0.7:1", "x", "h:0"]), JUNK, max_size=2)),
              "probe": JUNK, "unknown_key": JUNK},
)


@settings(max_examples=400, deadline=None)
@given(config=CONFIGS)
def test_any_config_value_validates_or_raises_a_validation_error_naming_the_field(config):
    try:
        CoordinatorConfig.model_validate(config)
    except ValidationError as exc:
        for error in exc.errors():
            assert error["loc"], error
            assert error["loc"][0] in CoordinatorConfig.model_fields or error["loc"][0] == "unknown_key", error
