"""Placement: proxies beside their workers, the coordinator on the head."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from coordinator.core.placement import NodeInfo, proxy_node
from tests.conftest import ROOT

NODES = [
    NodeInfo("head", "10.0.0.1", frozenset({"node:__internal_head__", "CPU"})),
    NodeInfo("gpu1", "10.0.0.7", frozenset({"GPU", "gpu-a"})),
    NodeInfo("gpu2", "10.0.0.8", frozenset({"GPU", "gpu-b"})),
    NodeInfo("gone", "10.0.0.9", frozenset({"GPU"}), alive=False),
]


def test_a_proxy_prefers_the_node_with_its_workers_ip():
    assert proxy_node("10.0.0.8", NODES, {}) == "gpu2"


def test_the_config_mapping_wins_over_the_ip():
    assert proxy_node("10.0.0.8", NODES, {"10.0.0.8": "gpu-a"}) == "gpu1"


def test_no_preference_when_nothing_matches_or_the_node_is_dead():
    assert proxy_node("127.0.0.1", NODES, {}) is None
    assert proxy_node("10.0.0.9", NODES, {}) is None
    assert proxy_node("10.0.0.7", NODES, {"10.0.0.7": "no-such-resource"}) is None
    assert proxy_node("10.0.0.7", NODES, {}, colocate=False) is None


@pytest.mark.ray
def test_proxies_coordinator_and_gateway_are_placed_on_a_multi_node_cluster():
    # Token auth on, with a token of its own: Ray's processes started by
    # cluster_utils do not create ~/.ray/auth_token as ray.init() does.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "tests/placement_cluster.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["coordinator"] == got["head"]
    assert got["proxies"]["127.0.0.2"] == got["node_a"]
    assert got["proxies"]["127.0.0.3"] == got["node_b"]
    # gateway.node_resource: the one node that carries a unit of it serves the gateway
    assert got["gateway"] == got["node_b"]
    assert got["gateway_units_free"] == 0  # its replica took the one unit there
