"""The reference worker's cost-model engine: request slots, a prefix cache of
chained block hashes with LRU eviction, prefill and decode costs, and vLLM's
load figures on /metrics. Pure logic first, then workers in-process over
loopback HTTP (no Ray), then the command line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from coordinator.core.models import ApplyType, WorkerApplyRequest
from reference_worker import EngineSettings, ReferenceWorker, SimModel, WorkerSettings
from reference_worker.engine import Engine, PrefixCache, block_hashes, render_prompt, tokens
from tests.conftest import ROOT, poll

# ---- pure: tokens, rendering, blocks, the LRU -------------------------------


def test_a_token_is_four_characters_a_partial_one_counted():
    assert [tokens("x" * n) for n in (0, 1, 4, 5, 16_000)] == [0, 1, 1, 2, 4_000]


def test_the_prompt_is_the_given_prompt_else_the_messages_rendered_in_order():
    messages = [{"role": "system", "content": "be brief"}, {"role": "human", "content": "hi"}]
    assert render_prompt({"messages": messages}) == "system: be brief\nhuman: hi\n"
    assert render_prompt({"messages": messages, "prompt": "raw"}) == "raw"
    parts = [{"role": "human", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_prompt({"messages": parts}) == "human: ab\n"
    assert render_prompt({}) == ""


def test_only_full_blocks_are_hashed():
    assert len(block_hashes("x" * 63, 64)) == 0
    assert len(block_hashes("x" * 64, 64)) == 1
    assert len(block_hashes("x" * 200, 64)) == 3


def test_a_block_hash_covers_the_whole_prefix_before_it():
    # Same block contents, different earlier blocks: different hashes (vLLM's chain).
    a = block_hashes("A" * 8 + "same", 4)
    b = block_hashes("B" * 8 + "same", 4)
    assert a[2] != b[2]


@given(st.text(max_size=120), st.text(max_size=60), st.text(max_size=60))
def test_leading_hashes_agree_exactly_as_far_as_whole_blocks_of_the_texts_do(common, tail_a, tail_b):
    a, b = common + tail_a, common + tail_b
    shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    ha, hb = block_hashes(a, 8), block_hashes(b, 8)
    same = next((i for i, (x, y) in enumerate(zip(ha, hb)) if x != y), min(len(ha), len(hb)))
    assert same == min(shared // 8, len(ha), len(hb))


def test_a_cached_prefix_is_the_leading_run_of_cached_blocks():
    cache = PrefixCache(capacity=10)
    cache.insert([b"a", b"b"])
    assert cache.match([b"a", b"b", b"c"]) == 2
    assert cache.match([b"x", b"a", b"b"]) == 0  # a gap at the start: nothing
    cache.insert([b"d"])
    assert cache.match([b"a", b"x", b"d"]) == 1  # stops at the first miss


def test_the_least_recently_used_blocks_go_first():
    cache = PrefixCache(capacity=4)
    cache.insert([b"a1", b"a2"])
    cache.insert([b"b1", b"b2"])
    assert cache.match([b"a1", b"a2"]) == 2  # a is now the more recent
    cache.insert([b"c1", b"c2"])
    assert len(cache) == 4
    assert cache.match([b"b1"]) == 0  # b went
    assert cache.match([b"a1", b"a2"]) == 2 and cache.match([b"c1", b"c2"]) == 2


def test_a_prompt_larger_than_the_cache_keeps_its_head():
    cache = PrefixCache(capacity=3)
    cache.insert([b"1", b"2", b"3", b"4", b"5"])
    assert cache.match([b"1", b"2", b"3", b"4", b"5"]) == 3


def test_an_empty_cache_holds_nothing():
    cache = PrefixCache(capacity=0)
    cache.insert([b"a"])
    assert len(cache) == 0 and cache.match([b"a"]) == 0


def test_the_benchmarks_settings_give_a_one_second_cold_and_twenty_ms_cached_prefill():
    s = EngineSettings(slots=8, cache_tokens=4 * 4_000 + 1_000, prefill_ms_per_token=0.25)
    assert s.prefill_seconds(4_000, 0) == pytest.approx(1.0)
    assert s.prefill_seconds(4_000, 4_000) == pytest.approx(0.02)
    assert s.block_tokens == 16 and s.cache_blocks == 17_000 // 16


@pytest.mark.parametrize("field,value", [("slots", 0), ("cache_tokens", -1), ("prefill_ms_per_token", -1),
                                         ("block_chars", 6), ("block_chars", 0), ("decode_ms_per_chunk", -0.1)])
def test_bad_engine_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        EngineSettings(**{field: value})
    assert err.value.errors()[0]["loc"] == (field,)


def test_an_unknown_engine_setting_is_refused():
    with pytest.raises(ValidationError, match="slot"):
        EngineSettings(slot=2)


# ---- the engine with a fake clock -----------------------------------------

@pytest.mark.anyio
async def test_the_engine_charges_prefill_for_uncached_tokens_then_each_chunk():
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    engine = Engine(EngineSettings(prefill_ms_per_token=1.0, cached_prefill_ms_per_token=0.1,
                                   decode_ms_per_chunk=5, block_chars=4, cache_tokens=100), sleep=sleep)
    prompt = "x" * 40 + "yz"  # 11 tokens, 10 in whole blocks
    async with engine.admit(prompt) as first:
        await engine.decode(first)
        await engine.decode(first)
    assert (first.prompt_tokens, first.cached_tokens, first.chunks) == (11, 0, 2)
    assert slept == pytest.approx([0.011, 0.005, 0.005])
    slept.clear()
    async with engine.admit(prompt) as second:
        pass
    assert second.cached_tokens == 10
    assert slept == pytest.approx([(1 * 1.0 + 10 * 0.1) / 1000])
    f = engine.figures()
    assert (f.queried_tokens, f.hit_tokens, f.requests, f.running, f.waiting) == (22, 10, 2, 0, 0)


@pytest.mark.anyio
async def test_a_request_cancelled_in_its_prefill_gives_its_slot_back_and_caches_nothing():
    engine = Engine(EngineSettings(slots=1, prefill_ms_per_token=1000, block_chars=4))
    task = asyncio.get_running_loop().create_task(engine.admit("abcdefgh").__aenter__())
    while engine.figures().running == 0:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.figures().running == 0 and len(engine.cache) == 0
    engine.settings.prefill_ms_per_token = 0  # the slot is free again
    async with engine.admit("abcdefgh") as again:
        assert again.cached_tokens == 0


# ---- workers over loopback HTTP ------------------------------------------

def chat(system: str, question: str = "how many rows?", model: str = "m") -> dict:
    return {"model": model, "messages": [{"role": "system", "content": system},
                                         {"role": "human", "content": question}]}


@pytest.fixture
async def start_worker():
    started: list[ReferenceWorker] = []

    async def start(engine: EngineSettings | None, **settings) -> tuple[ReferenceWorker, httpx.AsyncClient]:
        worker = ReferenceWorker(WorkerSettings(models=[SimModel(name="m")], engine=engine, **settings))
        await worker.start()
        started.append(worker)
        client = httpx.AsyncClient(base_url=f"http://{worker.address}", timeout=30)
        clients.append(client)
        return worker, client

    clients: list[httpx.AsyncClient] = []
    yield start
    for client in clients:
        await client.aclose()
    for worker in started:
        await worker.stop()


async def first_chunk_seconds(client: httpx.AsyncClient, body: dict) -> tuple[float, list[dict]]:
    """Seconds to the first streamed chunk, and every chunk."""
    started = time.monotonic()
    first = None
    chunks = []
    async with client.stream("POST", "/api/worker/generate_stream", json=body) as r:
        assert r.status_code == 200
        buffer = b""
        async for data in r.aiter_bytes():
            first = first if first is not None else time.monotonic() - started
            buffer += data
            *done, buffer = buffer.split(b"\0")  # DB-GPT ends each chunk with a NUL byte
            chunks += [json.loads(c) for c in done if c.strip()]
    return first, chunks


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """/metrics as {sample name: value} for model m (parsed by prometheus_client)."""
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.labels == {"model_name": "m"}:
                out[sample.name] = sample.value
    return out


def engine_entries(worker: ReferenceWorker) -> list[dict]:
    return [e["engine"] for e in worker.journal if e["path"].startswith("/api/worker/generate")]


@pytest.mark.anyio
async def test_at_most_slots_requests_run_and_the_rest_wait_in_arrival_order(start_worker):
    worker, client = await start_worker(EngineSettings(slots=2, prefill_ms_per_token=0, decode_ms_per_chunk=150))
    # Four slow requests (4 chunks x 150 ms), each sent once the one before is in the engine.
    tasks = []

    async def in_engine(n: int) -> bool:
        f = worker.engine_figures()["m"]
        return f.running + f.waiting == n

    for i in range(4):
        tasks.append(asyncio.get_running_loop().create_task(first_chunk_seconds(client, chat(f"tenant {i}"))))
        await poll(lambda: in_engine(i + 1))

    async def two_and_two():
        m = await scrape(client)
        return (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]) == (2, 2)

    await poll(two_and_two)
    await asyncio.gather(*tasks)
    m = await scrape(client)
    assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]) == (0, 0)
    entries = engine_entries(worker)
    # Slots were taken in arrival order, and never more than two at once.
    assert [e["t_slot"] for e in entries] == sorted(e["t_slot"] for e in entries)
    for e in entries:
        assert sum(o["t_slot"] <= e["t_slot"] < o["t_done"] for o in entries) <= 2
    assert entries[2]["queued_s"] > 0.1 and entries[0]["queued_s"] < 0.1


@pytest.mark.anyio
async def test_a_repeated_prompt_finds_its_prefix_cached_and_answers_much_sooner(start_worker):
    settings = EngineSettings(prefill_ms_per_token=0.25, decode_ms_per_chunk=1, cache_tokens=4_000)
    worker, client = await start_worker(settings)
    system = "s" * 4_000  # 1,000 tokens: a 250 ms cold prefill, ~5 ms cached
    cold, cold_chunks = await first_chunk_seconds(client, chat(system))
    warm, warm_chunks = await first_chunk_seconds(client, chat(system))
    first, second = engine_entries(worker)
    whole_blocks = len(block_hashes(render_prompt(chat(system)), settings.block_chars))
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == whole_blocks * settings.block_tokens > 990
    assert first["prefill_s"] == pytest.approx(settings.prefill_seconds(first["prompt_tokens"], 0), abs=1e-6)
    assert second["prefill_s"] < first["prefill_s"] / 10
    assert cold >= 3 * warm, (cold, warm)
    assert cold_chunks == warm_chunks  # the same answer either way


@pytest.mark.anyio
async def test_a_tenants_system_prompt_is_shared_by_different_questions(start_worker):
    worker, client = await start_worker(EngineSettings(prefill_ms_per_token=0, decode_ms_per_chunk=0))
    system = "tenant seven's schema " * 100
    await client.post("/api/worker/generate", json=chat(system, "first question"))
    await client.post("/api/worker/generate", json=chat(system, "an entirely different one"))
    _, second = engine_entries(worker)
    # Every whole block before the question starts is shared.
    assert second["cached_tokens"] == (len("system: " + system + "\nhuman: ") // 64) * 16


@pytest.mark.anyio
async def test_a_small_cache_evicts_the_least_recently_used_prompt(start_worker):
    # Room for one 1,000-token prompt (and a little more), not two.
    settings = EngineSettings(cache_tokens=1_200, prefill_ms_per_token=0, decode_ms_per_chunk=0)
    worker, client = await start_worker(settings)
    a, b = chat("a" * 4_000), chat("b" * 4_000)
    blocks_of_b = len(block_hashes(render_prompt(b), settings.block_chars))
    for body in (a, a, b, a, a):
        r = await client.post("/api/worker/generate", json=body)
        assert r.status_code == 200
    cached = [e["cached_tokens"] for e in engine_entries(worker)]
    assert cached[0] == 0 and cached[1] > 990  # a, then a again: hit
    assert cached[2] == 0  # b: miss, and it pushes a out
    # a again: only the head of a that b left room for (a prompt's tail goes first).
    assert cached[3] == (settings.cache_blocks - blocks_of_b) * settings.block_tokens < 250
    assert cached[4] > 990


@pytest.mark.anyio
async def test_metrics_parse_as_prometheus_text_and_the_counters_add_up(start_worker):
    worker, client = await start_worker(EngineSettings(prefill_ms_per_token=0, decode_ms_per_chunk=0))
    before = await scrape(client)
    assert before == {"vllm:num_requests_waiting": 0, "vllm:num_requests_running": 0,
                      "vllm:kv_cache_usage_perc": 0, "vllm:prefix_cache_queries_total": 0,
                      "vllm:prefix_cache_hits_total": 0}
    for _ in range(3):
        await first_chunk_seconds(client, chat("x" * 1_000))
    after = await scrape(client)
    entries = engine_entries(worker)
    assert after["vllm:prefix_cache_queries_total"] == sum(e["prompt_tokens"] for e in entries) > 0
    assert after["vllm:prefix_cache_hits_total"] == sum(e["cached_tokens"] for e in entries) > 0
    assert 0 < after["vllm:kv_cache_usage_perc"] < 1
    families = {f.name: f.type for f in text_string_to_metric_families((await client.get("/metrics")).text)}
    assert families["vllm:prefix_cache_hits"] == "counter" and families["vllm:num_requests_running"] == "gauge"


@pytest.mark.anyio
async def test_a_model_started_later_gets_its_own_engine(start_worker):
    worker, client = await start_worker(EngineSettings(prefill_ms_per_token=0, decode_ms_per_chunk=0))
    req = {"host": "127.0.0.1", "port": worker.port, "model": "second", "worker_type": "llm", "params": {}}
    assert (await client.post("/api/worker/models/startup", json=req)).status_code == 200
    await client.post("/api/worker/generate", json=chat("x" * 400, model="second"))
    figures = worker.engine_figures()
    assert set(figures) == {"m", "second"}
    assert figures["m"].requests == 0 and figures["second"].requests == 1
    assert 'vllm:num_requests_running{model_name="second"} 0.0' in (await client.get("/metrics")).text


@pytest.mark.anyio
async def test_generate_without_streaming_pays_every_chunk_before_answering(start_worker):
    worker, client = await start_worker(EngineSettings(prefill_ms_per_token=0, decode_ms_per_chunk=50), chunks=4)
    started = time.monotonic()
    r = await client.post("/api/worker/generate", json=chat("hello"))
    assert time.monotonic() - started >= 0.2
    assert r.json()["finish_reason"] == "stop"
    assert engine_entries(worker)[0]["chunks"] == 4


@pytest.mark.anyio
async def test_a_client_gone_midstream_gives_its_slot_back(start_worker):
    worker, client = await start_worker(EngineSettings(slots=1, prefill_ms_per_token=0, decode_ms_per_chunk=300))
    async with client.stream("POST", "/api/worker/generate_stream", json=chat("x")) as r:
        async for _ in r.aiter_lines():
            break  # one chunk, then hang up

    async def free():
        return (await scrape(client))["vllm:num_requests_running"] == 0

    await poll(free)
    assert engine_entries(worker)[0]["t_done"] is not None


@pytest.mark.anyio
async def test_a_model_that_stops_aborts_the_requests_it_runs_and_those_waiting_and_frees_their_slots(
        start_worker):
    worker, client = await start_worker(EngineSettings(slots=1, prefill_ms_per_token=0, decode_ms_per_chunk=300))
    loop = asyncio.get_running_loop()
    answers = [loop.create_task(client.post("/api/worker/generate", json=chat(f"tenant {i}"))) for i in range(2)]

    async def one_running_one_waiting():
        f = worker.engine_figures()["m"]
        return (f.running, f.waiting) == (1, 1)

    await poll(one_running_one_waiting)
    stop = WorkerApplyRequest(model="m", apply_type=ApplyType.STOP)
    await worker.apply(stop)
    assert [(r.status_code, r.text) for r in await asyncio.gather(*answers)] == [(500, "Internal Server Error")] * 2
    assert [e.get("aborted") for e in worker.journal if e["path"] == "/api/worker/generate"] == [True, True]
    f = worker.engine_figures()["m"]
    assert (f.running, f.waiting) == (0, 0)
    await worker.apply(stop.model_copy(update={"apply_type": ApplyType.START}))
    r = await client.post("/api/worker/generate", json=chat("again"))
    assert r.json()["finish_reason"] == "stop"  # the slot was given back


@pytest.mark.anyio
async def test_a_model_not_served_is_refused_before_taking_a_slot(start_worker):
    worker, client = await start_worker(EngineSettings(slots=1))
    r = await client.post("/api/worker/generate", json=chat("x", model="nope"))
    assert r.json()["error_code"] != 0
    assert "engine" not in worker.journal[-1] and worker.engine_figures()["m"].requests == 0


@pytest.mark.anyio
async def test_without_the_engine_the_worker_behaves_as_before(start_worker):
    worker, client = await start_worker(None, chunk_delay=0)
    assert (await client.get("/metrics")).status_code == 404
    _, chunks = await first_chunk_seconds(client, chat("s" * 4_000))
    r = await client.post("/api/worker/generate", json=chat("s" * 4_000))
    assert len(chunks) == 4 and r.json() == chunks[-1]
    assert all("engine" not in e for e in worker.journal)
    assert worker.engine_figures() == {}
    # The same answers as with the engine on.
    _, on = await start_worker(EngineSettings(prefill_ms_per_token=0, decode_ms_per_chunk=0))
    _, chunks_on = await first_chunk_seconds(on, chat("s" * 4_000))
    strip = lambda cs: [{**c, "content": c["content"]["object"]["data"].split("] ", 1)[1]} for c in cs]  # noqa: E731
    assert strip(chunks_on) == strip(chunks)


@pytest.mark.anyio
async def test_a_worker_requiring_a_token_answers_401_without_it(start_worker):
    _, client = await start_worker(None, require_token="t0ken")
    r = await client.get("/api/worker/models/supports")
    assert (r.status_code, r.text) == (401, "Unauthorized")
    r = await client.get("/api/worker/models/supports", headers={"Authorization": "Bearer t0ken"})
    assert r.status_code == 200


# ---- the command line -----------------------------------------------------


def test_the_command_line_turns_the_engine_on(worker_process):
    wp = worker_process("m@llm", slots=2, cache_tokens=500, prefill_ms_per_token=0.1, decode_ms_per_chunk=0,
                        block_chars=16)
    body = chat("p" * 800)
    with httpx.Client(base_url=f"http://127.0.0.1:{wp.port}", timeout=10) as client:
        for _ in range(2):
            assert client.post("/api/worker/generate", json=body).status_code == 200
        entries = [e["engine"] for e in client.get("/api/_reference/journal").json()]
        text = client.get("/metrics").text
    # 800 characters + "system: ...\nhuman: ...\n": whole 16-character (4-token) blocks are cached.
    assert entries[0]["cached_tokens"] == 0
    assert entries[1]["cached_tokens"] == len(render_prompt(body)) // 16 * 4
    assert 'vllm:prefix_cache_hits_total{model_name="m"} ' in text


def test_the_command_line_without_engine_flags_has_no_engine(worker_process):
    wp = worker_process("m@llm")
    assert httpx.get(f"http://127.0.0.1:{wp.port}/metrics").status_code == 404


@pytest.mark.parametrize("flags,field", [(["--slots", "0"], "--slots"), (["--block-chars", "10"], "--block-chars")])
def test_the_command_line_refuses_bad_engine_flags_naming_them(flags, field):
    done = subprocess.run([sys.executable, "-m", "reference_worker", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and field in done.stderr
