"""DB-GPT 0.8.2 itself talking to the fleet through the gateway.

DB-GPT → gateway → fleet: two reference workers serve ``fleet-chat`` behind a
coordinator's embedded registry and its gateway (``cluster.serve``). A DB-GPT
worker manager serves ``dbgpt-chat``, a ``proxy/openai`` model whose
``api_base`` is the gateway's ``/v1`` and whose upstream model name
(``backend``) is ``fleet-chat``. DB-GPT's own API server, unchanged, is asked
for ``dbgpt-chat`` (``POST /api/v1/chat/completions``, streamed and not); the
answer must be a reference worker's, word for word.

The DB-GPT worker manager registers with the same embedded registry under its
own model name (the simplest second registry: no DB-GPT controller process to
start on top, and the registry already serves DB-GPT's API server in
tests/test_dbgpt_traffic.py). Its worker manager is configured here, not with
``tests.dbgpt_env.start_worker_manager``: that one cannot set ``backend``
(the upstream model name) apart from the DB-GPT model's name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import ray

import coordinator
from coordinator.core.naming import gateway_actor
from tests.conftest import ROOT, free_port
from tests.dbgpt_env import DbgptProcess, start_apiserver
from tests.test_traffic import FAST, SLOW_HEARTBEATS, probed

pytestmark = [pytest.mark.ray, pytest.mark.dbgpt]

NAME = "dbgpt-gateway"
FLEET_MODEL = "fleet-chat"
DBGPT_MODEL = "dbgpt-chat"
QUESTION = "which worker answers through the gateway?"


def start_gateway_worker_manager(bin_dir: Path, port: int, controller: str, workdir: Path,
                                 api_base: str) -> DbgptProcess:
    """``dbgpt start worker`` serving DBGPT_MODEL: proxy/openai to ``api_base``,
    asking it for FLEET_MODEL (the pattern of tests.dbgpt_env.start_worker_manager)."""
    config = workdir / f"worker-{port}.toml"
    config.write_text(
        "[service.model.worker]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'controller_addr = "{controller}"\n'
        "heartbeat_interval = 1\n\n"
        "[[models.llms]]\n"
        f'name = "{DBGPT_MODEL}"\n'
        'provider = "proxy/openai"\n'
        f'backend = "{FLEET_MODEL}"\n'
        f'api_base = "{api_base}"\n'
        'api_key = "not-used"\n'  # the gateway holds no keys: loopback only
    )
    cmd = [str(bin_dir / "dbgpt"), "start", "worker", "-c", str(config)]
    return DbgptProcess(cmd, port, "/api/worker/models/supports", workdir, f"worker-{port}")


@pytest.fixture(scope="module")
def dbgpt_on_the_gateway(ray_session, dbgpt_bin, tmp_path_factory):
    """The fleet, its gateway, a DB-GPT worker manager on the gateway and
    DB-GPT's API server; yields (API server URL, the reference workers'
    addresses, the DB-GPT worker manager — its log says what went wrong)."""
    workdir = tmp_path_factory.mktemp("dbgpt-gateway")
    cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST}, name=NAME, namespace="tests")
    workers: list[subprocess.Popen] = []
    dbgpt: list[DbgptProcess] = []
    try:
        url = cluster.registry_url()
        addresses = []
        for _ in range(2):
            proc = subprocess.Popen([sys.executable, "-m", "reference_worker", "--port", "0", "--controller", url,
                                     "--heartbeat-interval", "1", "--model", f"{FLEET_MODEL}@llm", "--chunks", "4"],
                                    cwd=ROOT, stdout=subprocess.PIPE, text=True)
            workers.append(proc)
            line = proc.stdout.readline()  # "listening on host:port"
            assert line.startswith("listening on"), line
            addresses.append(f"127.0.0.1:{int(line.rsplit(':', 1)[1])}")
        probed(cluster, FLEET_MODEL, 2)
        base = cluster.serve(port=0)

        worker = start_gateway_worker_manager(dbgpt_bin, free_port(), url, workdir, f"{base}/v1")
        dbgpt.append(worker)
        cluster.wait_for(DBGPT_MODEL, count=1, timeout=60)
        probed(cluster, DBGPT_MODEL, 1)
        api = start_apiserver(dbgpt_bin, free_port(), url, workdir)
        dbgpt.append(api)
        yield api.url, addresses, worker
    finally:
        for proc in dbgpt:
            proc.kill()
        for proc in workers:
            proc.kill()
            proc.wait()
        cluster.stop(forget=True)


def expected(addresses: list[str]) -> set[str]:
    return {f"[{address}] {FLEET_MODEL} answers: {QUESTION}" for address in addresses}


def gateway_outcomes() -> dict[str, int]:
    stats = ray.get(ray.get_actor(gateway_actor(NAME, 0), namespace="tests").stats.remote(), timeout=30)
    return stats["outcomes"]


def test_dbgpts_api_server_answers_with_the_fleets_text_streamed_and_not(dbgpt_on_the_gateway):
    api, addresses, worker = dbgpt_on_the_gateway
    body = {"model": DBGPT_MODEL, "messages": [{"role": "user", "content": QUESTION}]}
    before = sum(gateway_outcomes().values())

    r = httpx.post(f"{api}/api/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, f"{r.text}\n{worker.tail()}"
    answer = r.json()
    assert answer["model"] == DBGPT_MODEL, answer
    assert answer["choices"][0]["message"]["content"] in expected(addresses), f"{answer}\n{worker.tail()}"

    deltas, events = [], []
    with httpx.stream("POST", f"{api}/api/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        assert s.status_code == 200, s.read()
        for line in s.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            events.append(data)
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for choice in chunk.get("choices") or []:
                deltas.append((choice.get("delta") or {}).get("content") or "")
    assert events and events[-1] == "[DONE]", events
    assert "".join(deltas) in expected(addresses), f"{events}\n{worker.tail()}"

    # Both went through the gateway (DB-GPT's worker knows no other way to the fleet).
    outcomes = gateway_outcomes()
    assert sum(outcomes.values()) - before == 2 and outcomes.get("success", 0) >= 2, outcomes
