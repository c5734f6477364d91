"""Security end to end on the session's local Ray: tokens from the config reach
the right workers through the coordinator and its proxies and show up nowhere
else, and a registry listing malicious entries gets none of them dispatched to."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings
from tests.conftest import wait_until

pytestmark = pytest.mark.ray

FLEET, OTHER, UNKNOWN = "fleet-token-8c1d", "override-token-2b7e", "nobody-has-this-3f0a"


@pytest.fixture(scope="module")
def host(ray_session):
    actor = ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote()
    yield actor
    ray.get(actor.stop_all.remote())
    ray.kill(actor)


@pytest.fixture(scope="module")
def tokens():
    os.environ["E2E_FLEET_TOKEN"], os.environ["E2E_OTHER_TOKEN"] = FLEET, OTHER
    yield
    del os.environ["E2E_FLEET_TOKEN"], os.environ["E2E_OTHER_TOKEN"]


def test_tokens_reach_the_right_workers_and_appear_nowhere_else(host, tokens):
    ports = ray.get([
        host.add.remote(WorkerSettings(models=[SimModel(name="secure")], require_token=token))
        for token in (FLEET, OTHER, UNKNOWN)
    ])
    by_source, overridden, refusing = ports
    cluster = coordinator.start(
        {
            "registries": [{
                "kind": "static", "name": "fleet",
                "instances": [{"model_name": "secure@llm", "host": "127.0.0.1", "port": p, "healthy": True}
                              for p in ports],
                "workers": {"token": {"env": "E2E_FLEET_TOKEN"}, "headers": {"X-Fleet": "prod"}},
            }],
            "worker_overrides": {f"127.0.0.1:{overridden}": {"token": {"env": "E2E_OTHER_TOKEN"}},
                                 f"127.0.0.1:{refusing}": {}},
            "timeouts": {"apply": 10, "connect": 2},
        },
        name="sec-tokens", namespace="tests",
    )
    try:
        cluster.wait_for("secure", count=3, timeout=30)
        result = cluster.apply("secure", "restart")
        outs = {o.port: o for o in result.outputs}
        assert outs[by_source].success and outs[overridden].success
        assert not outs[refusing].success and "HTTP 401" in outs[refusing].message
        journals = {p: ray.get(host.journal.remote(p)) for p in ports}
        assert journals[by_source][-1]["authorization"] == f"Bearer {FLEET}"
        assert journals[overridden][-1]["authorization"] == f"Bearer {OTHER}"
        assert journals[refusing][-1]["authorization"] == ""  # its override sends no token
        shown = " ".join([result.model_dump_json(), cluster.status().model_dump_json(),
                          repr(cluster.config), cluster.config.model_dump_json()])
        assert FLEET not in shown and OTHER not in shown
    finally:
        cluster.stop()


BAD_ENTRIES = [
    {"host": "evil.com/x?"}, {"host": "user@host"}, {"host": "host:1234"}, {"host": "http://host"},
    {"host": "127.0.0.1#"}, {"host": ""}, {"host": "h" * 300}, {"host": "wörker"}, {"host": "a\r\nb"},
    {"port": -1}, {"port": 0}, {"port": 70000}, {"port": True}, {"model_name": "m" * 300 + "@llm"},
]


@pytest.fixture
def hostile_controller(host):
    """A DB-GPT-protocol controller (a plain http.server) listing one real worker
    among entries crafted to turn into requests elsewhere."""
    [good] = ray.get([host.add.remote(WorkerSettings(models=[SimModel(name="target")]))])
    entry = {"model_name": "target@llm", "host": "127.0.0.1", "port": good, "healthy": True}
    listing = json.dumps([entry] + [{**entry, **bad} for bad in BAD_ENTRIES]).encode()

    class Controller(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(listing)))
            self.end_headers()
            self.wfile.write(listing)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Controller)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", good
    server.shutdown()
    server.server_close()


def test_entries_that_are_not_a_bare_host_and_port_are_dropped_counted_and_never_dispatched(hostile_controller):
    url, good = hostile_controller
    cluster = coordinator.start(
        {"registries": [{"kind": "dbgpt", "name": "hostile", "url": url, "poll_interval": 0.5}],
         "timeouts": {"apply": 10, "connect": 2}},
        name="sec-entries", namespace="tests",
    )
    try:
        cluster.wait_for("target", count=1, timeout=30)
        [watcher] = cluster.status().watchers
        assert watcher.rejected_entries == len(BAD_ENTRIES)
        assert len(watcher.rejected_examples) == 10
        assert "evil.com/x?" in watcher.rejected_examples[0]
        status = cluster.status()
        assert status.proxies == 1
        assert [(i.host, i.port) for i in status.instances] == [("127.0.0.1", good)]
        result = cluster.apply("target", "restart")
        assert [(o.port, o.success) for o in result.outputs] == [(good, True)]
    finally:
        cluster.stop()


def test_a_registry_token_keeps_unauthenticated_writes_out_end_to_end(ray_session, tmp_path):
    import httpx

    token = tmp_path / "registry-token"
    token.write_text("reg-secret-91")
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "name": "main", "port": 0, "token": {"file": str(token)}}]},
        name="sec-registry", namespace="tests",
    )
    try:
        url = cluster.registry_url()
        entry = {"model_name": "m@llm", "host": "127.0.0.1", "port": 18001}
        assert httpx.post(f"{url}/api/controller/models", json=entry, timeout=5).status_code == 401
        ok = httpx.post(f"{url}/api/controller/models", json=entry, timeout=5,
                        headers={"Authorization": "Bearer reg-secret-91"})
        assert ok.status_code == 200
        wait_until(lambda: cluster.instances("m", healthy_only=False), 10, what="registered with the token")
        assert "reg-secret-91" not in cluster.status().model_dump_json() + repr(cluster.config)
    finally:
        cluster.stop()
