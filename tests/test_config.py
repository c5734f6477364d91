"""The configuration model: sources by kind, files, and errors that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from coordinator.core.liveset import screen_entries
from coordinator.core.config import (
    BackoffSettings,
    CoordinatorConfig,
    DbgptSource,
    EmbeddedSource,
    StaticSource,
    read_instances_file,
)


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
