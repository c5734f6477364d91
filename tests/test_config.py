"""The configuration model: sources by kind, files, the gateway's flow control, and errors that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from coordinator.core.liveset import screen_entries
from coordinator.core.config import (
    BackoffSettings,
    CoordinatorConfig,
    DbgptSource,
    EmbeddedSource,
    GatewaySettings,
    StaticSource,
    read_instances_file,
)
from coordinator.core.flow import Share


def test_sources_are_chosen_by_kind_and_named_by_position():
    config = CoordinatorConfig.model_validate(
        {
            "registries": [
                {"kind": "embedded", "port": 0},
                {"kind": "dbgpt", "url": "http://10.0.0.5:8000/"},
                {"kind": "static", "instances": [{"model_name": "m@llm", "host": "h", "port": 1}]},
            ]
        }
    )
    kinds = [type(s) for s in config.registries]
    assert kinds == [EmbeddedSource, DbgptSource, StaticSource]
    assert [s.name for s in config.registries] == ["embedded-0", "dbgpt-1", "static-2"]
    assert config.registries[1].controller_urls == ["http://10.0.0.5:8000"]


def test_defaults_are_the_documented_ones():
    config = CoordinatorConfig(registries=[EmbeddedSource()])
    t = config.timeouts
    assert (t.connect, t.apply, t.startup, t.shutdown, t.supports) == (5, 300, 900, 120, 30)
    src = config.registries[0]
    assert (src.host, src.heartbeat_interval, src.heartbeat_timeout) == ("127.0.0.1", 5, 60)
    assert (config.probe.interval, config.probe.timeout, config.probe.failures_to_dead) == (1, 1, 2)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"registries": []}, "registries"),
        ({"registries": [{"kind": "zookeeper"}]}, "zookeeper"),
        ({"registries": [{"kind": "dbgpt"}]}, "needs 'url' or 'urls'"),
        ({"registries": [{"kind": "dbgpt", "url": "ftp://x"}]}, "url"),
        ({"registries": [{"kind": "static"}]}, "exactly one"),
        ({"registries": [{"kind": "embedded", "port": 70000}]}, "port"),
        ({"registries": [{"kind": "embedded", "heartbeat_interval": 5, "heartbeat_timeout": 5}]}, "heartbeat_timeout"),
        ({"registries": [{"kind": "embedded", "name": "a"}, {"kind": "static", "name": "a", "instances": []}]}, "unique"),
        ({"registries": [{"kind": "embedded"}], "timeouts": {"apply": 0}}, "apply"),
        ({"registries": [{"kind": "embedded"}], "timout": {}}, "timout"),
    ],
)
def test_mistakes_are_rejected_with_a_message_naming_them(data, needle):
    with pytest.raises(ValidationError) as info:
        CoordinatorConfig.model_validate(data)
    assert needle in str(info.value)


def test_loads_yaml_with_static_paths_relative_to_the_file(tmp_path):
    (tmp_path / "fleet.yaml").write_text(
        "instances:\n  - {model_name: m@llm, host: 10.0.0.7, port: 18001, healthy: true}\n"
    )
    conf = tmp_path / "coordinator.yaml"
    conf.write_text(
        "registries:\n  - kind: static\n    path: fleet.yaml\ntimeouts:\n  apply: 60\n"
    )
    config = CoordinatorConfig.from_file(conf)
    assert config.timeouts.apply == 60
    [inst] = screen_entries(read_instances_file(config.registries[0].path)).instances
    assert (inst.host, inst.port) == ("10.0.0.7", 18001)


def test_backoff_doubles_up_to_its_maximum():
    b = BackoffSettings(initial=0.5, maximum=4)
    assert [b.delay(n) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]
    with pytest.raises(ValidationError):
        BackoffSettings(initial=2, maximum=1)


def test_the_example_config_loads_and_its_commented_security_settings_validate(tmp_path, monkeypatch):
    from tests.conftest import ROOT

    example = ROOT / "examples" / "coordinator.yaml"
    assert CoordinatorConfig.from_file(example).registries[0].host == "0.0.0.0"
    # The same file with its commented worker settings switched on (TLS left
    # out: its files do not exist here).
    text = example.read_text()
    for line in ("    #workers:", "    #  token:", "    #  headers:", "#worker_overrides:", '#  "10.0.0.7:8001"'):
        text = text.replace(line, line.replace("#", "", 1))
    (tmp_path / "token").write_text("t")
    text = text.replace("/etc/fleet/gpu-7-token", str(tmp_path / "token"))
    monkeypatch.setenv("FLEET_TOKEN", "from-the-env")
    (tmp_path / "c.yaml").write_text(text)
    config = CoordinatorConfig.from_file(tmp_path / "c.yaml")
    assert config.registries[0].workers.token.reveal() == "from-the-env"
    assert config.registries[0].workers.headers == {"X-Fleet": "prod"}
    assert list(config.worker_overrides) == ["10.0.0.7:8001"]


# ---- the gateway's flow control ---------------------------------------------

@pytest.fixture
def tenant_keys(monkeypatch):
    monkeypatch.setenv("FLOW_GOLD_KEYS", "sk-gold-1\nsk-gold-2\n")
    monkeypatch.setenv("FLOW_PLAIN_KEYS", "sk-plain-1\nsk-gold-1\nsk-plain-2\n")


def test_flow_tenants_are_named_groups_of_keys_and_every_other_key_is_its_own(tenant_keys):
    gateway = GatewaySettings.model_validate({
        "host": "0.0.0.0", "api_keys": [{"env": "FLOW_PLAIN_KEYS"}],
        "flow": {"capacity": 8, "models": {"big": 32}, "default": {"max_in_flight": 4},
                 "tenants": [{"name": "gold", "keys": [{"env": "FLOW_GOLD_KEYS"}], "weight": 3, "priority": 2,
                              "max_priority": 5}]},
    })
    assert gateway.key_tenants() == [("sk-gold-1", "gold"), ("sk-gold-2", "gold"),
                                     ("sk-plain-1", "api_keys[0]#1"), ("sk-plain-2", "api_keys[0]#3")]
    flow = gateway.flow
    policy = flow.policy()
    assert policy.capacity_of("big") == 32 and policy.capacity_of("small") == 8
    assert policy.share_of("gold") == Share(weight=3)
    assert policy.share_of("api_keys[0]#1") == Share(max_in_flight=4)
    assert (flow.max_queued, flow.max_wait, flow.retry_after, flow.priority_header) == (1024, 30, 1, "X-Priority")
    gold = flow.share("gold")
    assert gold.priority_for(None) == 2 and gold.priority_for("5") == 5 and gold.priority_for("0") == 0
    for asked in ("6", "-1", "high", "1.5", "9" * 50, ""):
        with pytest.raises(ValueError, match="from 0 to 5"):
            gold.priority_for(asked)
    assert flow.share("api_keys[0]#3").priority_for(None) == 0


def test_tenant_keys_alone_let_the_gateway_serve_beyond_loopback(tenant_keys):
    GatewaySettings.model_validate({"host": "0.0.0.0", "flow": {
        "capacity": 1, "tenants": [{"name": "gold", "keys": [{"env": "FLOW_GOLD_KEYS"}]}]}})
    with pytest.raises(ValidationError, match="flow.tenants"):
        GatewaySettings.model_validate({"host": "0.0.0.0", "flow": {"capacity": 1}})


def test_callers_flow_control_names_its_tenants_without_keys():
    config = CoordinatorConfig.model_validate({"registries": [{"kind": "embedded"}], "caller": {"flow": {
        "capacity": 2, "models": {"big": 8}, "max_wait": 5,
        "tenants": [{"name": "batch", "weight": 1, "max_queued": 10}, {"name": "chat", "weight": 4, "priority": 1}]}}})
    flow = config.caller.flow
    assert flow.policy().capacity_of("big") == 8 and flow.policy().share_of("chat") == Share(weight=4)
    assert flow.share("chat").priority == 1 and flow.share("anyone").priority == 0
    assert CoordinatorConfig.model_validate({"registries": [{"kind": "embedded"}]}).caller.flow is None  # off


@pytest.mark.parametrize(("flow", "needle"), [
    ({}, "capacity"),
    ({"capacity": 0}, "capacity"),
    ({"capacity": 1, "models": {"m": 0}}, "models.m"),
    ({"capacity": 1, "max_queued": -1}, "max_queued"),
    ({"capacity": 1, "max_wait": 0}, "max_wait"),
    ({"capacity": 1, "priority_header": "X Priority"}, "priority_header"),
    ({"capacity": 1, "default": {"weight": 0}}, "default.weight"),
    ({"capacity": 1, "default": {"priority": 3, "max_priority": 2}}, "max_priority (2) must be >= priority (3)"),
    ({"capacity": 1, "tenants": [{"name": "t", "keys": []}]}, "tenants.0.keys"),
    ({"capacity": 1, "tenants": [{"name": "a b", "keys": [{"env": "FLOW_GOLD_KEYS"}]}]}, "tenants.0.name"),
    ({"capacity": 1, "tenants": [{"name": "t", "keys": [{"env": "FLOW_GOLD_KEYS"}]},
                                 {"name": "t", "keys": [{"env": "FLOW_PLAIN_KEYS"}]}]}, "repeated: ['t']"),
    ({"capacity": 1, "tenants": [{"name": "gold", "keys": [{"env": "FLOW_GOLD_KEYS"}]},
                                 {"name": "plain", "keys": [{"env": "FLOW_PLAIN_KEYS"}]}]},
     "tenants 'gold' and 'plain' share a key"),
    ({"capacity": 1, "tenants": [{"name": "t", "keys": [{"env": "FLOW_GOLD_KEYS"}], "wieght": 2}]}, "wieght"),
])
def test_flow_mistakes_are_rejected_naming_the_field(tenant_keys, flow, needle):
    with pytest.raises(ValidationError) as info:
        GatewaySettings.model_validate({"flow": flow})
    assert needle in str(info.value)
    assert "sk-" not in str(info.value)  # never a key in an error
