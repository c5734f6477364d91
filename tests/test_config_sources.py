"""Configuration from a file, the environment and explicit settings, in that
order: every field has its COORDINATOR_* variable, a typo is an error naming
it, secrets stay references wherever the config is shown, and what travels to
an actor is the driver's config, whatever the actor's own environment says."""

from __future__ import annotations

import json
import os
import pickle
import typing

import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from coordinator.core.config import CoordinatorConfig, EmbeddedSource
from coordinator.core.config_sources import (
    ENV_PREFIX,
    environment_settings,
    load_config,
    merge,
    parse_assignments,
)
from coordinator.driver.cli import cli, gateway_settings

REGISTRIES = '[{"kind": "embedded", "port": 0}]'
SECRET = "sk-never-shown-4f1c9e"


@pytest.fixture
def clean_env(monkeypatch):
    """No COORDINATOR_* variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


def write(tmp_path, text: str):
    path = tmp_path / "coordinator.yaml"
    path.write_text(text)
    return path


# -- every field, by name --------------------------------------------------

#: Sections with no default that the base config below provides, so that
#: their fields can be set one by one.
BASE = {"registries": [{"kind": "embedded", "port": 0}], "gateway": {"flow": {"capacity": 1}}}


def _scalar_kind(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return annotation
    if args and typing.get_origin(annotation) is not typing.Literal and len(args) == 1:
        return _scalar_kind(args[0])
    return annotation if annotation in (bool, int, float, str) else None


def _leaves(model: type[BaseModel], path: tuple[str, ...] = ()):
    """(path, annotation, default) of every scalar field reachable through sections."""
    for name, field in model.model_fields.items():
        here = (*path, name)
        if typing.get_origin(field.annotation) in (list, dict):
            continue  # given whole, as JSON
        sub = [t for t in typing.get_args(field.annotation) or (field.annotation,)
               if isinstance(t, type) and issubclass(t, BaseModel)]
        if sub and "secret" not in sub[0].__name__.lower():
            if field.default is not None or ".".join(here) in ("gateway", "gateway.flow"):
                yield from _leaves(sub[0], here)
            continue
        kind = _scalar_kind(field.annotation)
        if kind is not None:
            default = 1 if field.default is PydanticUndefined else field.default
            if default is not None:
                yield here, kind, default


def _another(kind, default) -> str:
    """A valid value other than the default, as a variable would hold it."""
    if typing.get_origin(kind) is typing.Literal:
        return next(str(v) for v in typing.get_args(kind) if v != default)
    if kind is bool:
        return "false" if default else "true"
    if kind is int:
        return str(default + 1)
    if kind is float:
        return str(default * 2 if default else 1.0)
    return "127.0.0.2" if default.replace(".", "").isdigit() else f"{default}-x"


LEAVES = list(_leaves(CoordinatorConfig))


def test_the_walk_reaches_the_sections_that_matter():
    paths = {".".join(p) for p, _, _ in LEAVES}
    assert {"gateway.port", "caller.report_every", "probe.enabled", "gateway.flow.default.weight",
            "gateway.limits.max_tokens", "routing.policy", "change_pace", "timeouts.apply"} <= paths
    assert len(paths) > 50


@pytest.mark.parametrize("path,kind,default", LEAVES, ids=[".".join(p) for p, _, _ in LEAVES])
def test_every_field_has_its_variable(clean_env, path, kind, default):
    value = _another(kind, default)
    name = ENV_PREFIX + "__".join(path).upper()
    got = CoordinatorConfig.model_validate(merge(BASE, environment_settings({name: value})))
    for part in path:
        got = getattr(got, part)
    assert got != default
    assert str(got).lower() == value.lower() or float(got) == float(value)


def test_names_are_case_insensitive_and_values_are_read_as_their_field_says(clean_env):
    config = load_config(environ={"COORDINATOR_REGISTRIES": REGISTRIES, "coordinator_probe__enabled": "false",
                                  "Coordinator_Caller__Report_Every": "2", "COORDINATOR_GATEWAY__PORT": "8200"})
    assert (config.probe.enabled, config.caller.report_every, config.gateway.port) == (False, 2.0, 8200)


def test_lists_mappings_and_sections_are_json_and_a_mapping_key_may_have_its_own_variable(clean_env):
    config = load_config(environ={
        "COORDINATOR_REGISTRIES": '[{"kind": "embedded", "port": 0}, {"kind": "dbgpt", "url": "http://h:1"}]',
        "COORDINATOR_HEADERS": '{"X-Fleet": "prod"}',
        "COORDINATOR_PLACEMENT__HOST_RESOURCES__10.0.0.7": "gpu-a",
        "COORDINATOR_TIMEOUTS": '{"apply": 7, "startup": 70}',
        "COORDINATOR_GATEWAY__FLOW": '{"capacity": 3, "models": {"Qwen-7B": 5}}',
    })
    assert [s.kind for s in config.registries] == ["embedded", "dbgpt"]
    assert config.headers == {"X-Fleet": "prod"}  # JSON keeps a key's case
    assert config.placement.host_resources == {"10.0.0.7": "gpu-a"}
    assert (config.timeouts.apply, config.timeouts.startup, config.timeouts.connect) == (7, 70, 5)
    assert config.gateway.flow.models == {"Qwen-7B": 5}


# -- the order: file < environment < explicit ----------------------------------


def test_the_environment_beats_the_file_and_explicit_settings_beat_both(clean_env, tmp_path):
    path = write(tmp_path, "registries: [{kind: embedded, port: 0}]\n"
                           "gateway: {port: 8100, replicas: 2, max_in_flight: 7}\n"
                           "caller: {report_every: 1, report_ttl: 9}\n"
                           "timeouts: {apply: 11}\n")
    environ = {"COORDINATOR_GATEWAY__PORT": "8200", "COORDINATOR_GATEWAY__REPLICAS": "3",
               "COORDINATOR_CALLER__REPORT_EVERY": "2"}
    config = load_config(path, environ=environ, overrides={"gateway": {"port": 8300}})
    assert config.gateway.port == 8300  # explicit, over the environment's 8200 and the file's 8100
    assert config.gateway.replicas == 3  # the environment's, over the file's
    assert config.gateway.max_in_flight == 7  # the file's: a section is merged key by key
    assert (config.caller.report_every, config.caller.report_ttl) == (2, 9)
    assert config.timeouts.apply == 11
    assert load_config(path, environ={}).gateway.port == 8100


def test_a_list_from_the_environment_replaces_the_files_whole(clean_env, tmp_path):
    path = write(tmp_path, "registries: [{kind: embedded, port: 0}, {kind: static, instances: []}]\n")
    config = load_config(path, environ={"COORDINATOR_REGISTRIES": '[{"kind": "dbgpt", "url": "http://h:1"}]'})
    assert [s.kind for s in config.registries] == ["dbgpt"]


def test_validation_comes_after_merging_so_a_file_may_leave_out_what_the_environment_gives(clean_env, tmp_path):
    path = write(tmp_path, "gateway: {host: 0.0.0.0}\n")  # alone: no registries, and open on every address
    with pytest.raises(ValidationError):
        CoordinatorConfig.from_file(path)
    config = load_config(path, environ={"COORDINATOR_REGISTRIES": REGISTRIES, "GATEWAY_KEYS": SECRET,
                                        "COORDINATOR_GATEWAY__API_KEYS": '[{"env": "GATEWAY_KEYS"}]'})
    assert config.gateway.keys() == [SECRET]


def test_no_file_and_no_variables_is_the_missing_field_named(clean_env):
    with pytest.raises(ValidationError) as info:
        load_config(environ={})
    assert info.value.errors()[0]["loc"] == ("registries",)


def test_merge_goes_into_mappings_and_replaces_everything_else():
    below = {"a": {"x": 1, "y": [1, 2]}, "b": 1, "c": {"k": 1}}
    above = {"a": {"y": [3]}, "b": {"now": "a mapping"}, "c": 5}
    assert merge(below, above) == {"a": {"x": 1, "y": [3]}, "b": {"now": "a mapping"}, "c": 5}
    assert below == {"a": {"x": 1, "y": [1, 2]}, "b": 1, "c": {"k": 1}}  # untouched


def test_set_pairs_are_dotted_keys_with_yaml_values():
    assert parse_assignments(["gateway.port=8200", "gateway.host=0.0.0.0", "probe.enabled=false",
                              "registries=[{kind: embedded, port: 0}]"]) == {
        "gateway": {"port": 8200, "host": "0.0.0.0"}, "probe": {"enabled": False},
        "registries": [{"kind": "embedded", "port": 0}]}
    for bad in ["gateway.port", "=1", "gateway..port=1"]:
        with pytest.raises(ValueError, match="key=value"):
            parse_assignments([bad])


# -- mistakes -------------------------------------------------------------------


@pytest.mark.parametrize("name,needle", [
    ("COORDINATOR_GATEWAY__PROT", "did you mean COORDINATOR_GATEWAY__PORT"),
    ("COORDINATOR_GATEWAY_PORT", "did you mean COORDINATOR_GATEWAY__PORT"),  # one underscore
    ("COORDINATOR_CALLER__REPORT_EVERYY", "did you mean COORDINATOR_CALLER__REPORT_EVERY"),
    ("COORDINATOR_NO_SUCH_THING", "no setting no_such_thing"),
    ("COORDINATOR_REGISTRIES__0__PORT", "COORDINATOR_REGISTRIES is one value"),
    ("COORDINATOR_PROBE__INTERVAL__X", "COORDINATOR_PROBE__INTERVAL is one value"),
])
def test_a_variable_that_sets_nothing_is_an_error_naming_it(name, needle):
    with pytest.raises(ValueError) as info:
        environment_settings({"COORDINATOR_REGISTRIES": REGISTRIES, name: "8200"})
    assert name in str(info.value) and needle in str(info.value)


def test_a_mapping_key_that_would_lose_its_case_is_an_error_pointing_to_json():
    with pytest.raises(ValueError, match="give the whole mapping as JSON in COORDINATOR_HEADERS"):
        environment_settings({"COORDINATOR_HEADERS__X-Fleet": "prod"})


def test_kubernetes_service_links_are_not_settings(clean_env):
    links = {"COORDINATOR_SERVICE_HOST": "10.0.0.1", "COORDINATOR_SERVICE_PORT": "8000",
             "COORDINATOR_SERVICE_PORT_HTTP": "8000", "COORDINATOR_PORT": "tcp://10.0.0.1:8000",
             "COORDINATOR_PORT_8000_TCP": "tcp://10.0.0.1:8000", "COORDINATOR_PORT_8000_TCP_PROTO": "tcp",
             "COORDINATOR_PORT_8000_TCP_PORT": "8000", "COORDINATOR_PORT_8000_TCP_ADDR": "10.0.0.1",
             "COORDINATOR_GATEWAY_SERVICE_HOST": "10.0.0.2", "COORDINATOR_GATEWAY_PORT": "tcp://10.0.0.2:8100"}
    assert environment_settings(links) == {}
    assert load_config(environ={**links, "COORDINATOR_REGISTRIES": REGISTRIES}).gateway is None


def test_a_value_that_must_be_json_and_is_not_is_named_without_echoing_it():
    for name in ("COORDINATOR_REGISTRIES", "COORDINATOR_TIMEOUTS", "COORDINATOR_GATEWAY__API_KEYS"):
        with pytest.raises(ValueError) as info:
            environment_settings({name: f"[{SECRET}"})
        assert name in str(info.value) and "JSON" in str(info.value)
        assert SECRET not in str(info.value)


def test_a_bad_value_is_the_field_named(clean_env):
    with pytest.raises(ValidationError) as info:
        load_config(environ={"COORDINATOR_REGISTRIES": REGISTRIES, "COORDINATOR_GATEWAY__PORT": "eighty"})
    assert info.value.errors()[0]["loc"] == ("gateway", "port")


# -- secrets ---------------------------------------------------------------------


def _secret_config(clean_env, tmp_path):
    clean_env.setenv("WORKER_TOKEN", SECRET)
    (tmp_path / "keys").write_text(SECRET + "-key\n")
    return load_config(environ={
        **os.environ,
        "COORDINATOR_REGISTRIES": '[{"kind": "embedded", "port": 0, "token": {"env": "WORKER_TOKEN"}}]',
        "COORDINATOR_GATEWAY__API_KEYS": json.dumps([{"file": str(tmp_path / "keys")}]),
        "COORDINATOR_WORKER_OVERRIDES__h:1__TOKEN__ENV": "WORKER_TOKEN",
    })


def test_secrets_from_the_environment_are_read_and_never_shown(clean_env, tmp_path):
    config = _secret_config(clean_env, tmp_path)
    assert config.registries[0].token.reveal() == SECRET
    assert config.gateway.keys() == [SECRET + "-key"]
    assert config.worker_overrides["h:1"].token.reveal() == SECRET
    shown = [repr(config), str(config), repr(config.registries[0]), str(config.gateway),
             json.dumps(config.model_dump(mode="json")), config.model_dump_json(), str(config.model_dump())]
    for text in shown:
        assert SECRET not in text
    assert "WORKER_TOKEN" in config.model_dump_json()  # where it is read from is what shows


def test_a_secret_given_in_clear_is_refused_without_echoing_it(clean_env):
    for name, value in [("COORDINATOR_GATEWAY__API_KEYS", json.dumps([SECRET])),
                        ("COORDINATOR_WORKER_OVERRIDES__h:1__TOKEN", SECRET)]:
        with pytest.raises(ValidationError) as info:
            load_config(environ={"COORDINATOR_REGISTRIES": REGISTRIES, name: value})
        assert "never in clear" in str(info.value) and SECRET not in str(info.value)


def test_secrets_are_read_from_the_environ_given(clean_env):
    environ = {"COORDINATOR_REGISTRIES": '[{"kind": "embedded", "port": 0, "token": {"env": "T"}}]', "T": SECRET}
    assert load_config(environ=environ).registries[0].token.reveal() == SECRET
    with pytest.raises(ValidationError, match="environment variable T is not set"):
        load_config(environ={**environ, "T": ""})


def test_the_config_command_prints_the_merged_config_and_no_secret(clean_env, tmp_path):
    path = write(tmp_path, "registries: [{kind: embedded, port: 0, token: {env: WORKER_TOKEN}}]\n"
                           "gateway: {port: 8100, replicas: 2}\n")
    env = {"WORKER_TOKEN": SECRET, "COORDINATOR_GATEWAY__PORT": "8200"}
    result = CliRunner(env=env).invoke(cli, ["config", "--config", str(path), "--set", "gateway.replicas=4"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["gateway"] == {"port": 8200, "replicas": 4}
    assert shown["registries"][0]["token"] == {"env": "WORKER_TOKEN"}
    everything = CliRunner(env=env).invoke(cli, ["config", "--config", str(path), "--all", "--json"])
    assert json.loads(everything.output)["timeouts"]["apply"] == 300
    for out in (result.output, everything.output):
        assert SECRET not in out


def test_the_command_line_names_a_mistyped_variable_in_one_line(clean_env, tmp_path):
    path = write(tmp_path, "registries: [{kind: embedded, port: 0}]\n")
    result = CliRunner(env={"COORDINATOR_GATEWAY__PROT": "8200"}).invoke(cli, ["config", "--config", str(path)])
    assert result.exit_code == 2
    assert "COORDINATOR_GATEWAY__PROT" in result.output and "COORDINATOR_GATEWAY__PORT" in result.output


def test_serve_takes_the_files_gateway_then_the_environment_then_its_options(clean_env, tmp_path):
    path = write(tmp_path, "registries: [{kind: embedded, port: 0}]\n"
                           "gateway: {port: 8100, replicas: 2, max_in_flight: 7}\n")
    assert gateway_settings(None).port == 8100  # nothing given: the defaults
    clean_env.setenv("COORDINATOR_GATEWAY__PORT", "8200")
    clean_env.setenv("COORDINATOR_GATEWAY__REPLICAS", "3")
    settings = gateway_settings(str(path), port=8300, host=None, replicas=None)
    assert (settings.port, settings.replicas, settings.max_in_flight) == (8300, 3, 7)
    assert gateway_settings(None, port=None).port == 8200


# -- travelling to actors --------------------------------------------------------


def test_a_built_config_reads_no_environment_of_its_own(clean_env):
    clean_env.setenv("COORDINATOR_GATEWAY__PORT", "8200")
    clean_env.setenv("COORDINATOR_PROBE__ENABLED", "false")
    config = CoordinatorConfig(registries=[EmbeddedSource(port=0)])  # taken as written
    assert config.gateway is None and config.probe.enabled
    again = CoordinatorConfig.model_validate(config.model_dump())
    assert again == config


def test_a_pickled_config_keeps_the_drivers_values_whatever_the_environment_says_later(clean_env, tmp_path):
    config = _secret_config(clean_env, tmp_path)
    clean_env.setenv("WORKER_TOKEN", "the-actors-own")
    clean_env.setenv("COORDINATOR_GATEWAY__PORT", "9999")
    travelled = pickle.loads(pickle.dumps(config))
    assert travelled == config
    assert travelled.registries[0].token.reveal() == SECRET
    assert travelled.gateway.port == 8100


@pytest.mark.ray
def test_an_actor_gets_the_drivers_config_not_its_own_environment(ray_session, clean_env, tmp_path):
    import ray

    from tests.conftest import ROOT

    clean_env.setenv("WORKER_TOKEN", SECRET)
    config = load_config(environ={**os.environ, "COORDINATOR_CALLER__REPORT_EVERY": "2",
                                  "COORDINATOR_REGISTRIES":
                                      '[{"kind": "embedded", "port": 0, "token": {"env": "WORKER_TOKEN"}}]'})

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self, config: CoordinatorConfig) -> None:
            self.config = config

        def seen(self) -> tuple:
            return (self.config.caller.report_every, self.config.registries[0].token.reveal(),
                    os.environ.get("COORDINATOR_CALLER__REPORT_EVERY"), os.environ.get("WORKER_TOKEN"))

    own_env = {"PYTHONPATH": str(ROOT), "COORDINATOR_CALLER__REPORT_EVERY": "3", "WORKER_TOKEN": "the-actors-own"}
    holder = Holder.options(runtime_env={"env_vars": own_env}).remote(config)
    try:
        every, token, actors_every, actors_token = ray.get(holder.seen.remote(), timeout=120)
    finally:
        ray.kill(holder)
    assert (actors_every, actors_token) == ("3", "the-actors-own")  # the actor's environment differs...
    assert (every, token) == (2.0, SECRET)  # ...and the config is still the driver's
