"""The gateway's ASGI app with a fake fleet behind it (no Ray, no workers):
what each failure answers, that keys are checked, that a client going away
ends the worker call, and a hypothesis fuzz of request bodies — never a 5xx,
never a worker sent an invalid request."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.core.config import GatewaySettings
from coordinator.core.inference import ModelOutput, Route
from coordinator.core.openai import EmbeddingsRequestBody, PromptRequestBody
from coordinator.driver.gateway import GatewayApp
from coordinator.driver.worker_manager import NoInstanceError, NotReachedError, WorkerFailedError

pytestmark = pytest.mark.anyio


class FakeFleet:
    """Stands for a RayWorkerManager: checks every request a worker would get."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.fail: Exception | None = None
        self.listed = {"chat@llm", "embed@text2vec", "dead@llm"}
        self.closed = 0
        self.hold = asyncio.Event()
        self.hold.set()
        self.cluster = SimpleNamespace(aio=SimpleNamespace(instances=self._instances))

    async def _instances(self, model, worker_type, healthy_only):
        names = [k for k in self.listed if model is None or k == f"{model}@{worker_type}"]
        return [SimpleNamespace(model_name=k) for k in names]

    def _route(self, route) -> None:
        if route is not None:
            route.went(Route("chat@llm", "h", 1, 1.0, ("a",)), ["load"])

    async def routed_stream(self, params, worker_type="llm", route=None, headers=None):
        PromptRequestBody.model_validate(params)  # never an invalid request to a worker
        self.sent.append(params)
        self._route(route)
        if self.fail is not None:
            raise self.fail
        try:
            for i in range(1, 4):
                await self.hold.wait()
                yield ModelOutput(text="ab" * i)
        finally:
            self.closed += 1

    async def routed_call(self, key, method, path, route=None, **kwargs):
        body = kwargs["json"]
        (EmbeddingsRequestBody if path == "/embeddings" else PromptRequestBody).model_validate(body)
        self.sent.append(body)
        self._route(route)
        if self.fail is not None:
            raise self.fail
        if path == "/embeddings":
            return [[0.5, 0.25] for _ in body["input"]]
        return {"text": "hello", "error_code": 0}


def app(fleet: FakeFleet, **settings: Any) -> httpx.AsyncClient:
    gateway = GatewayApp(fleet, GatewaySettings.model_validate(settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw")


CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("fail,status,code", [
    (NoInstanceError("chat@llm: none healthy"), 503, "no_instance"),
    (NoInstanceError("chat@llm: every instance is busy", busy=True), 429, "rate_limit_exceeded"),
    (NotReachedError("chat@llm: tried h:1 (refused)"), 503, "no_instance"),
    (WorkerFailedError("chat@llm at h:1: HTTP 500", worker="h:1"), 502, "worker_error"),
])
async def test_each_failure_answers_its_status_in_openais_shape(fail, status, code):
    fleet = FakeFleet()
    fleet.fail = fail
    async with app(fleet) as c:
        for body in (CHAT, {**CHAT, "stream": True}):
            r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == status and r.json()["error"]["code"] == code
            assert ("Retry-After" in r.headers) == (status == 429)


async def test_an_unknown_model_is_404_and_a_listed_dead_one_503():
    fleet = FakeFleet()
    fleet.fail = NoInstanceError("none")
    async with app(fleet) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "dead"})
        assert r.status_code == 503


async def test_keys_are_required_when_configured():
    fleet = FakeFleet()
    async with app(fleet, api_keys=[{"env": "GATEWAY_TEST_KEYS"}]) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 401
        bad = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-no"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        good = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-two"})
        assert good.status_code == 200
    assert len(fleet.sent) == 1  # only the authorised request reached a worker


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    monkeypatch.setenv("GATEWAY_TEST_KEYS", "sk-one\nsk-two\n")


async def test_too_many_requests_held_answer_429_with_retry_after():
    fleet = FakeFleet()
    fleet.hold.clear()  # streams hang after their first chunk... and before it
    gateway = GatewayApp(fleet, GatewaySettings(max_in_flight=1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as c:
        first = asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        for _ in range(200):
            if gateway.in_flight:
                break
            await asyncio.sleep(0.01)
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        fleet.hold.set()
        assert (await first).status_code == 200


async def test_a_stream_reads_as_openai_chunks_and_ends_with_done():
    fleet = FakeFleet()
    async with app(fleet) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks) == "ababab"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert fleet.closed == 1


async def test_a_stream_broken_midway_ends_with_an_error_event_naming_the_worker():
    fleet = FakeFleet()

    async def broken(params, worker_type="llm", route=None, headers=None):
        fleet._route(route)
        yield ModelOutput(text="ab")
        raise WorkerFailedError("chat@llm at h:1: stream broken after 1 chunks: connection lost", worker="h:1")

    fleet.routed_stream = broken
    async with app(fleet) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: {")]
    assert "error" in events[-1] and "h:1" in events[-1]["error"]["message"]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                        max_size=4), max_leaves=20)
fields = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["chat", "embed", "nope", "", 5]) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                                "content": st.text(max_size=30) | json_values}), max_size=3)
    | json_values,
    "prompt": st.text(max_size=30) | json_values,
    "input": st.lists(st.text(max_size=10), max_size=3) | json_values,
    "stream": st.booleans() | json_values,
    "max_tokens": st.integers(-5, 10**7) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6) | json_values,
    "n": st.integers(0, 3),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/v1/chat/completions"]),
       body=fields | json_values, raw=st.booleans())
def test_fuzzed_bodies_never_make_a_5xx_nor_reach_a_worker_invalid(path, body, raw):
    async def run() -> None:
        fleet = FakeFleet()
        async with app(fleet) as c:
            content = json.dumps(body).encode() if not raw else json.dumps(body)[:-1].encode()
            r = await c.post(path, content=content, headers={"Content-Type": "application/json"})
            assert r.status_code < 500, (r.status_code, r.text)
            assert r.status_code in (200, 400, 404), r.text
            if r.status_code == 400:
                assert r.json()["error"]["type"] == "invalid_request_error"
            # (the fake fleet validated every request that reached it)
    asyncio.run(run())


async def test_the_trace_context_is_passed_on_to_the_worker():
    fleet = FakeFleet()
    seen: list[dict] = []
    real = fleet.routed_stream

    def spy(params, worker_type="llm", route=None, headers=None):
        seen.append(headers or {})
        return real(params, worker_type, route, headers)

    fleet.routed_stream = spy
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with app(fleet) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"traceparent": trace})
    assert r.status_code == 200 and seen == [{"traceparent": trace}]


async def test_a_client_that_goes_away_ends_the_worker_call():
    fleet = FakeFleet()
    gateway = GatewayApp(fleet, GatewaySettings())
    body = json.dumps({**CHAT, "stream": True}).encode()
    first_chunk = asyncio.Event()
    sent: list[dict] = []
    requested = False

    async def stalls(params, worker_type="llm", route=None, headers=None):
        fleet._route(route)
        try:
            yield ModelOutput(text="ab")
            await asyncio.Event().wait()  # the worker has nothing more to say for now
        finally:
            fleet.closed += 1

    fleet.routed_stream = stalls

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
             "scheme": "http", "server": ("gw", 80), "client": ("c", 1), "root_path": ""}
    call = asyncio.create_task(gateway(scope, receive, send))
    await asyncio.wait_for(first_chunk.wait(), 5)  # then the client hangs up
    await asyncio.wait_for(call, 5)
    assert fleet.closed == 1  # the worker call was closed with the client, not left running
    assert gateway.in_flight == 0 and gateway.outcomes["cancelled"] == 1, gateway.outcomes
