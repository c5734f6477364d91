"""Run by tests/test_placement.py in its own process: a three-node Ray cluster on
one machine (ray.cluster_utils), where every raylet shares one IP, so proxies are
placed through the config's host -> custom resource mapping, and the gateway on
the node that carries its ``gateway.node_resource``. Prints JSON."""

import json
import os
import time

import ray
from ray.cluster_utils import Cluster

import coordinator

os.environ.setdefault("RAY_AUTH_MODE", "token")
cluster_nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
node_a = cluster_nodes.add_node(num_cpus=0, resources={"gpu-host-a": 1})
node_b = cluster_nodes.add_node(num_cpus=0, resources={"gpu-host-b": 1, "gateway-node": 1})
cluster_nodes.wait_for_nodes()
ray.init(address=cluster_nodes.address, namespace="placement", logging_level="WARNING")
try:
    # Loopback hosts, probes off: nothing is sent anywhere; only placement matters.
    instances = [{"model_name": "m@llm", "host": h, "port": 18001, "healthy": True}
                 for h in ("127.0.0.2", "127.0.0.3", "127.0.0.4")]
    cluster = coordinator.start(
        {"registries": [{"kind": "static", "instances": instances}], "probe": {"enabled": False},
         "placement": {"host_resources": {"127.0.0.2": "gpu-host-a", "127.0.0.3": "gpu-host-b"}}},
        name="placement", namespace="placement",
    )
    cluster.wait_for("m", count=3, timeout=60)
    coord = ray.get_actor("placement", namespace="placement")
    proxies = {h: ray.get(coord.proxy_handle.remote(h, 18001)) for h in ("127.0.0.2", "127.0.0.3", "127.0.0.4")}
    where = {h: ray.get(p.process_info.remote(), timeout=60)["node_id"] for h, p in proxies.items()}
    cluster.serve(settings={"port": 0, "node_resource": "gateway-node"})
    gateway = ray.get_actor("placement/gateway/0", namespace="placement")
    deadline = time.monotonic() + 15  # available resources are reported asynchronously
    while ray.available_resources().get("gateway-node", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    print(json.dumps({
        # Every raylet here shares one IP, so the driver may sit on any node:
        # the head is the node with the head marker resource.
        "head": next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"]),
        "coordinator": ray.get(coord.process_info.remote())["node_id"],
        "node_a": node_a.node_id, "node_b": node_b.node_id,
        "proxies": where,
        "gateway": ray.get(gateway.process_info.remote(), timeout=60)["node_id"],
        "gateway_units_free": ray.available_resources().get("gateway-node", 0),
    }))
    cluster.stop()
finally:
    ray.shutdown()
    cluster_nodes.shutdown()
