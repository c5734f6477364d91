"""The gateway end to end: a coordinator on the session's Ray, reference
workers as processes, the gateway as a Ray actor, and OpenAI's own Python
client calling it — streaming and not, completions, embeddings, models, the
errors in OpenAI's shape, and a worker killed under streamed load."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

import coordinator
from tests.test_traffic import FAST, SLOW_HEARTBEATS, probed
from tests.conftest import wait_until

pytestmark = pytest.mark.ray

KEY = "sk-test-gateway-key"


@pytest.fixture(scope="module")
def fleet(ray_session, tmp_path_factory):
    """One coordinator, two chat workers and one embedding worker, a gateway
    behind an API key (read from a file)."""
    from tests.conftest import WorkerProcess  # noqa: F401 - the fixture's type
    import subprocess
    import sys

    from tests.conftest import ROOT

    keyfile = tmp_path_factory.mktemp("keys") / "keys"
    keyfile.write_text(f"{KEY}\nsk-another\n")
    cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST,
                                 "gateway": {"port": 0, "api_keys": [{"file": str(keyfile)}]}},
                                name="gateway-e2e", namespace="tests")
    url = cluster.registry_url()
    procs = []

    def spawn(*models: str, **flags) -> tuple[subprocess.Popen, int]:
        cmd = [sys.executable, "-m", "reference_worker", "--port", "0", "--controller", url,
               "--heartbeat-interval", "1"]
        for m in models:
            cmd += ["--model", m]
        for flag, value in flags.items():
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.startswith("listening on"), line
        procs.append(proc)
        return proc, int(line.rsplit(":", 1)[1])

    chat = [spawn("chat@llm", chunks=6, chunk_delay=0.05) for _ in range(2)]
    spawn("embed@text2vec")
    probed(cluster, "chat", 2)
    probed(cluster, "embed", 1)
    base = cluster.serve(settings={"port": 0, "api_keys": [{"file": str(keyfile)}]})  # idempotent: the running one
    yield cluster, base, chat
    for proc in procs:
        proc.kill()
        proc.wait()
    cluster.stop(forget=True)


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


def test_openai_clients_chat_streaming_and_not(fleet):
    _, base, _ = fleet
    c = client(base)
    answer = c.chat.completions.create(model="chat", messages=[{"role": "system", "content": "be brief"},
                                                               {"role": "user", "content": "hello"}], max_tokens=32)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    # The same answer as the worker's own, non-streamed (the reference worker's text is deterministic,
    # after the tag naming whichever worker answered: a prompt this short is routed by load).
    again = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert again.choices[0].message.content.split("] ", 1)[1] == text.split("] ", 1)[1] == "chat answers: hi"


def test_completions_embeddings_and_models(fleet):
    _, base, _ = fleet
    c = client(base)
    done = c.completions.create(model="chat", prompt="Once upon a time", max_tokens=8)
    assert done.choices[0].text
    vectors = c.embeddings.create(model="embed", input=["a", "b"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 0
    assert {"chat", "embed"} <= {m.id for m in c.models.list().data}
    # DB-GPT's API server's paths answer too.
    r = httpx.get(f"{base}/api/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200 and {"chat", "embed"} <= {m["id"] for m in r.json()["data"]}


def test_errors_come_in_openais_shape_with_the_right_status(fleet):
    _, base, _ = fleet
    with pytest.raises(openai.AuthenticationError) as bad_key:
        client(base, "sk-wrong").chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert bad_key.value.status_code == 401
    c = client(base)
    with pytest.raises(openai.NotFoundError) as unknown:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model="chat", messages=[{"role": "wizard", "content": "x"}])
    assert bad.value.body["param"] == "messages.0.role"
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=b"{" + b" " * (5 * 1024 * 1024) + b"}", timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, content=b"not json",
                   timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_killed_worker_under_streamed_load_loses_only_what_was_in_flight(fleet):
    cluster, base, chat = fleet
    (victim, victim_port), (_, survivor_port) = chat
    results: list[tuple[float, str]] = []  # (started, outcome)
    stop = threading.Event()

    async def one(c: openai.AsyncOpenAI) -> None:
        started = time.monotonic()
        try:
            stream = await c.chat.completions.create(model="chat", stream=True,
                                                     messages=[{"role": "user", "content": f"q {started}"}])
            async for _ in stream:
                pass
            results.append((started, "ok"))
        except Exception as exc:  # noqa: BLE001 - each failure is counted
            results.append((started, f"{type(exc).__name__}: {exc}"))

    async def load() -> None:
        # Closed here, on its own loop: left to the garbage collector, the
        # client's pool would be closed later on whatever loop runs then (a
        # later test's), and fail there with "Event loop is closed".
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30) as c:
            tasks = set()
            while not stop.is_set():
                t = asyncio.create_task(one(c))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks)

    runner = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
    runner.start()
    try:
        wait_until(lambda: len(results) >= 10, timeout=30, what="load running")
        killed = time.monotonic()
        victim.kill()
        victim.wait()
        wait_until(lambda: sum(1 for s, _ in results if s > killed + 3) >= 20, timeout=60,
                   what="20 requests started from 3 s after the kill")
    finally:
        stop.set()
        runner.join(timeout=60)
    late = [o for s, o in results if s > killed + 3]
    assert late and all(o == "ok" for o in late), [o for o in late if o != "ok"][:3]
    early = [o for s, o in results if killed - 1 < s <= killed + 3]
    failed = [o for o in early if o != "ok"]
    # What failed had reached the victim (a stream broken midway); never a request that was never sent.
    assert all("Connect" not in o for o in failed), failed


def test_a_crashed_gateway_is_restarted_by_ray_on_its_port(ray_session, worker_process):
    """The gateway's actors are Ray's to restart: killed, one serves again on
    the same address, and the fleet answers through it."""
    import ray

    from tests.conftest import free_port

    cluster = coordinator.start({"registries": [SLOW_HEARTBEATS], **FAST}, name="gateway-restart",
                                namespace="tests")
    try:
        worker_process("solo@llm", controller=cluster.registry_url(), heartbeat_interval=1)
        probed(cluster, "solo", 1)
        base = cluster.serve(port=free_port())
        assert cluster.serve(port=int(base.rsplit(":", 1)[1])) == base  # idempotent
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=10)
        assert c.chat.completions.create(model="solo", messages=[{"role": "user", "content": "a"}]).choices
        actor = ray.get_actor("gateway-restart/gateway/0", namespace="tests")
        pid = ray.get(actor.process_info.remote())["pid"]
        ray.kill(actor, no_restart=False)

        def answers() -> bool:
            try:
                return bool(c.chat.completions.create(model="solo", messages=[{"role": "user", "content": "b"}]).choices)
            except openai.APIError:
                return False

        wait_until(answers, timeout=60, what="the restarted gateway answering on its port")

        def new_pid() -> bool:
            try:
                return ray.get(actor.process_info.remote(), timeout=10)["pid"] != pid
            except ray.exceptions.RayError:  # the handle catching up with the restart
                return False

        wait_until(new_pid, timeout=30, what="a new gateway process")
    finally:
        cluster.stop(forget=True)
