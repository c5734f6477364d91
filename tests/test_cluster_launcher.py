"""ray_cluster.yaml passes Ray's own config preparation and schema validation,
offline (no node is launched), and does what the docs say it does."""

from __future__ import annotations

import copy

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from coordinator.core.config import CoordinatorConfig
from tests.conftest import ROOT


def load() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_cluster_file_passes_rays_preparation_and_schema():
    prepared = prepare_config(copy.deepcopy(load()))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_every_node_installs_the_project_and_keeps_token_auth():
    config = load()
    assert any("pip install" in c and "ray-model-coordinator" in c for c in config["setup_commands"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    # jobs run `python` from PATH: it must be the interpreter with the project
    assert all("export PATH=~/rmc-venv/bin:$PATH" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


def test_the_head_starts_the_coordinator_from_a_valid_config():
    [cmd] = [c for c in load()["head_start_ray_commands"] if "coordinator" in c and " start " in c]
    path = cmd.split("--config", 1)[1].split()[0].replace("~/ray-model-coordinator/", "")
    config = CoordinatorConfig.from_file(ROOT / path)
    assert config.registries[0].kind == "embedded"
