"""The examples run, against reference workers, so they cannot rot. They join the
session's Ray through RAY_ADDRESS, as a driver on a real cluster would."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import ray

import coordinator
from reference_worker import ReferenceWorkerHost, SimModel, WorkerSettings
from tests.conftest import ROOT

pytestmark = pytest.mark.ray


def run_example(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "COLUMNS": "240"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_rolling_restart_example(ray_session):
    done = run_example("examples/rolling_restart.py")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "plan: 5 instances in 3 batches (nothing sent)" in out
    assert "rolling restart: success=True" in out
    assert out.count("start successfully") >= 5
    assert "rolling restart with a failing worker: success=False" in out
    assert "not attempted: batch 2 of 3 failed" in out


def test_dbgpt_cluster_example_against_a_controller_process(ray_session, worker_process):
    controller = subprocess.Popen([sys.executable, "-m", "actors.registry", "--port", "0"], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
    try:
        url = controller.stdout.readline().split()[-1]
        for _ in range(2):
            worker_process("chatgpt-test@llm", controller=url, heartbeat_interval=1)
        done = run_example("examples/dbgpt_cluster.py", "--controller", url, "--restart", "chatgpt-test")
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("start successfully") == 2
        assert "can run: chatgpt-test (proxy/openai)" in done.stdout
    finally:
        controller.kill()
        controller.wait()


def test_job_submit_example_runs_as_a_ray_job_against_a_running_coordinator(ray_session):
    cluster = coordinator.start(
        {"registries": [{"kind": "embedded", "port": 0, "heartbeat_interval": 1, "heartbeat_timeout": 3}]},
        name="job-example", namespace="tests", detached=True,
    )
    host = ray.remote(ReferenceWorkerHost).options(num_cpus=0).remote()
    try:
        ray.get([host.add.remote(WorkerSettings(controller=cluster.registry_url(), heartbeat_interval=1,
                                                models=[SimModel(name="job-model")])) for _ in range(2)])
        cluster.wait_for("job-model", count=2, timeout=30)
        # The command in the example's docstring, with this interpreter for `python`.
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        done = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_session,
             "--working-dir", ".", "--", sys.executable, "examples/job_submit.py", "--model", "job-model",
             "--name", "job-example", "--namespace", "tests"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "job-model@llm: 2 instances" in done.stdout
        assert done.stdout.count("start successfully") == 2
    finally:
        ray.get(host.stop_all.remote())
        ray.kill(host)
        cluster.stop()


def test_deployments_example_heals_and_scales(ray_session):
    done = run_example("examples/deployments.py")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "deployed chat-small@llm (generation 1), embed-small@text2vec (generation 1)" in out
    assert "killed the worker manager at" in out and "chat-small@llm ready again in" in out
    assert "chat-small@llm scaled to 3" in out and "stopped cleanly" in out


def test_batch_inference_example_spreads_and_survives_a_killed_worker(ray_session):
    done = run_example("examples/batch_inference.py", "--prompts", "300", "--concurrency", "16", "--kill-one")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "killed one worker halfway" in out
    answered, failed = map(int, re.search(r"answered (\d+), failed (\d+)", out).groups())
    assert answered + failed == 300
    assert failed <= 16  # at most the requests in flight on the worker when it died
    assert len(re.findall(r"│ 127\.0\.0\.1:\d+ │\s+\d+ │", out)) == 3


def test_openai_client_example_talks_to_the_fleet_through_the_gateway(ray_session):
    done = run_example("examples/openai_client.py", "--requests", "12")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "gateway at http://127.0.0.1:" in out and "models: chat, embed" in out
    assert "embeddings: 2 vectors of" in out and "stopped cleanly" in out
    # A shared system prompt: after the first, the cache-aware router keeps them where it is cached.
    hits = int(re.search(r"prefix_hit (\d+)", out).group(1))
    assert hits >= 10, out
