"""The gateway's ASGI app with a fake fleet behind it (no Ray, no workers):
what each failure answers, that keys are checked, that a client going away
ends the worker call, and a hypothesis fuzz of request bodies — never a 5xx,
never a worker sent an invalid request."""

from __future__ import annotations

import asyncio
from collections import Counter
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
from tests.conftest import poll

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


# ---- flow control --------------------------------------------------------

ONE, TWO = {"Authorization": "Bearer sk-one"}, {"Authorization": "Bearer sk-two"}  # two tenants, a key each


def flowed(fleet: FakeFleet, **settings: Any) -> tuple[GatewayApp, httpx.AsyncClient]:
    gateway = GatewayApp(fleet, GatewaySettings.model_validate({"api_keys": [{"env": "GATEWAY_TEST_KEYS"}],
                                                                 **settings}))
    return gateway, httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw")


def said(text: str, **extra: Any) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": text}], **extra}


def sent(fleet: FakeFleet) -> list[str]:
    """What each request the workers got said, in the order they got them."""
    return [p["messages"][-1]["content"] for p in fleet.sent]


async def holding(gateway: GatewayApp, c: httpx.AsyncClient, headers: dict[str, str]) -> asyncio.Task:
    """A stream that holds a place (the fake fleet's ``hold`` is clear) until the fleet is let go."""
    task = asyncio.create_task(c.post("/v1/chat/completions", json=said("holder", stream=True), headers=headers))
    await poll(lambda: gateway.flow_counts()["flow_in_flight"] == 1, what="the stream holds its place")
    return task


async def queued(gateway: GatewayApp, c: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]):
    before = gateway.flow_counts()["flow_queued"]
    task = asyncio.create_task(c.post("/v1/chat/completions", json=body, headers=headers))
    await poll(lambda: gateway.flow_counts()["flow_queued"] == before + 1, what="the request waits")
    return task


async def test_a_noisy_tenant_cannot_crowd_out_a_quiet_one():
    fleet = FakeFleet()
    fleet.hold.clear()
    gateway, c = flowed(fleet, flow={"capacity": 1})
    async with c:
        first = await holding(gateway, c, ONE)
        noisy = [await queued(gateway, c, said(f"noisy-{i}"), ONE) for i in range(3)]
        quiet = await queued(gateway, c, said("quiet"), TWO)
        fleet.hold.set()
        answers = await asyncio.gather(first, *noisy, quiet)
    assert [r.status_code for r in answers] == [200] * 5
    # The place the stream let go of went to the quiet tenant, ahead of the noisy one's earlier requests.
    assert sent(fleet) == ["holder", "quiet", "noisy-0", "noisy-1", "noisy-2"]
    assert gateway.flow_counts() == {"flow_queued": 0, "flow_in_flight": 0}


async def test_requests_waiting_for_a_place_are_reported_as_demand_for_their_model():
    fleet = FakeFleet()
    fleet.hold.clear()
    reported: Counter[str] = Counter()
    fleet.demand = lambda key, change: reported.update({key: change})  # RayWorkerManager.demand
    gateway, c = flowed(fleet, flow={"capacity": 1})
    async with c:
        first = await holding(gateway, c, ONE)
        waiting = [await queued(gateway, c, said(f"w-{i}"), TWO) for i in range(2)]
        assert +reported == {"chat@llm": 2}  # the router reports them as queued: the autoscaler's demand
        fleet.hold.set()
        assert [r.status_code for r in await asyncio.gather(first, *waiting)] == [200] * 3
    assert +reported == {}


async def test_a_full_queue_answers_429_and_pushes_out_the_flooders_request_for_a_quiet_one():
    fleet = FakeFleet()
    fleet.hold.clear()
    gateway, c = flowed(fleet, flow={"capacity": 1, "max_queued": 1, "retry_after": 3})
    async with c:
        first = await holding(gateway, c, ONE)
        waiting = await queued(gateway, c, said("noisy-0"), ONE)
        full = await c.post("/v1/chat/completions", json=said("noisy-1"), headers=ONE)
        assert full.status_code == 429 and full.headers["Retry-After"] == "3"
        assert full.json()["error"]["code"] == "rate_limit_exceeded"
        assert "gateway.flow.max_queued" in full.json()["error"]["message"]
        quiet = asyncio.create_task(c.post("/v1/chat/completions", json=said("quiet"), headers=TWO))
        pushed = await waiting
        assert pushed.status_code == 429 and "gave its place" in pushed.json()["error"]["message"]
        fleet.hold.set()
        assert [(await first).status_code, (await quiet).status_code] == [200, 200]
    assert sent(fleet) == ["holder", "quiet"]
    assert gateway.outcomes["http_429"] == 2


async def test_a_request_that_waits_past_max_wait_gets_429_and_never_reaches_a_worker():
    fleet = FakeFleet()
    fleet.hold.clear()
    gateway, c = flowed(fleet, flow={"capacity": 1, "max_wait": 0.2})
    async with c:
        first = await holding(gateway, c, ONE)
        late = await c.post("/v1/chat/completions", json=said("late"), headers=TWO)
        assert late.status_code == 429 and "Retry-After" in late.headers
        assert "gateway.flow.max_wait" in late.json()["error"]["message"]
        fleet.hold.set()
        assert (await first).status_code == 200
    assert sent(fleet) == ["holder"]
    assert gateway.flow_counts() == {"flow_queued": 0, "flow_in_flight": 0}


async def test_a_priority_header_goes_first_within_the_keys_bounds(monkeypatch):
    monkeypatch.setenv("GW_BATCH", "sk-batch")
    monkeypatch.setenv("GW_URGENT", "sk-urgent")
    fleet = FakeFleet()
    fleet.hold.clear()
    batch, urgent = {"Authorization": "Bearer sk-batch"}, {"Authorization": "Bearer sk-urgent"}
    gateway, c = flowed(fleet, flow={"capacity": 1, "tenants": [
        {"name": "batch", "keys": [{"env": "GW_BATCH"}]},
        {"name": "urgent", "keys": [{"env": "GW_URGENT"}], "max_priority": 3}]})
    async with c:
        bad = await c.post("/v1/chat/completions", json=CHAT, headers={**batch, "X-Priority": "1"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Priority"
        assert "from 0 to 0" in bad.json()["error"]["message"]
        first = await holding(gateway, c, batch)
        low = await queued(gateway, c, said("low"), urgent)  # its own default priority, 0
        early = await queued(gateway, c, said("early"), batch)
        high = await queued(gateway, c, said("high"), {**urgent, "X-Priority": "3"})
        fleet.hold.set()
        assert {r.status_code for r in await asyncio.gather(first, low, early, high)} == {200}
    assert sent(fleet)[:2] == ["holder", "high"]


def raw_request(body: dict[str, Any], headers: dict[str, str], leave: asyncio.Event,
                sent_messages: list[dict]) -> tuple[dict, Any, Any]:
    """An ASGI request whose client goes away once ``leave`` is set."""
    encoded = json.dumps(body).encode()
    requested = False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": encoded, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent_messages.append(message)
        await asyncio.sleep(0)  # a real server's send lets other tasks run

    raw_headers = [(b"content-type", b"application/json")] + [(k.lower().encode(), v.encode())
                                                              for k, v in headers.items()]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": raw_headers, "http_version": "1.1", "scheme": "http",
             "server": ("gw", 80), "client": ("c", 1), "root_path": ""}
    return scope, receive, send


async def test_a_waiting_request_whose_client_goes_away_leaves_the_queue_unsent():
    fleet = FakeFleet()
    fleet.hold.clear()
    gateway, c = flowed(fleet, flow={"capacity": 1})
    leave = asyncio.Event()
    async with c:
        first = await holding(gateway, c, ONE)
        call = asyncio.create_task(gateway(*raw_request(said("gone"), TWO, leave, [])))
        await poll(lambda: gateway.flow_counts()["flow_queued"] == 1, what="the request waits")
        leave.set()
        await asyncio.wait_for(call, 5)
        assert gateway.flow_counts()["flow_queued"] == 0 and gateway.outcomes["cancelled"] == 1
        fleet.hold.set()
        assert (await first).status_code == 200
    assert sent(fleet) == ["holder"]
    assert gateway.flow_counts() == {"flow_queued": 0, "flow_in_flight": 0}


async def test_a_stream_whose_client_goes_away_lets_go_of_its_place():
    fleet = FakeFleet()
    first_chunk = asyncio.Event()

    async def stalls(params, worker_type="llm", route=None, headers=None):
        fleet.sent.append(params)
        fleet._route(route)
        yield ModelOutput(text="ab")
        if params["messages"][-1]["content"] == "stalls":
            first_chunk.set()
            await asyncio.Event().wait()  # nothing more for now: only its client leaving ends it
        yield ModelOutput(text="abcd")

    fleet.routed_stream = stalls
    gateway, c = flowed(fleet, flow={"capacity": 1})
    messages: list[dict] = []
    leave = asyncio.Event()
    async with c:
        call = asyncio.create_task(gateway(*raw_request(said("stalls", stream=True), ONE, leave, messages)))
        await asyncio.wait_for(first_chunk.wait(), 5)
        waiting = await queued(gateway, c, said("next", stream=True), TWO)
        leave.set()  # the client hangs up mid-stream
        await asyncio.wait_for(call, 5)
        assert (await waiting).status_code == 200
    assert sent(fleet) == ["stalls", "next"]
    assert gateway.flow_counts() == {"flow_queued": 0, "flow_in_flight": 0}


async def test_a_stream_whose_client_left_before_its_body_started_lets_go_of_its_place_too():
    fleet = FakeFleet()
    gateway, _ = flowed(fleet, flow={"capacity": 1})
    gone = asyncio.Event()
    gone.set()  # the disconnect is the next message after the body: it ends the answer as it starts
    messages: list[dict] = []
    await asyncio.wait_for(gateway(*raw_request(said("s", stream=True), ONE, gone, messages)), 5)
    # Cut at the first wait after its first chunk (which is written without
    # waiting for anything: the first token is never behind a check).
    assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
    assert messages[1]["more_body"]  # never finished
    assert gateway.flow_counts() == {"flow_queued": 0, "flow_in_flight": 0}


async def test_a_stream_whose_client_left_ends_quietly_and_one_the_server_cancels_stays_cancelled():
    """The client going away is the stream's own cancel, swallowed; a cancel
    from elsewhere (the server shutting down) goes on. Either way the worker
    call is let go of."""
    fleet = FakeFleet()
    first_chunk = asyncio.Event()
    closed = asyncio.Event()

    async def stalls(params, worker_type="llm", route=None, headers=None):
        fleet._route(route)
        try:
            yield ModelOutput(text="ab")
            first_chunk.set()
            await asyncio.Event().wait()
            yield ModelOutput(text="abcd")
        finally:
            closed.set()

    fleet.routed_stream = stalls
    gateway, _ = flowed(fleet)
    for shutdown in (False, True):
        first_chunk.clear(), closed.clear()
        leave = asyncio.Event()
        call = asyncio.create_task(gateway(*raw_request(said("s", stream=True), ONE, leave, [])))
        await asyncio.wait_for(first_chunk.wait(), 5)
        leave.set()
        if shutdown:
            call.cancel()
        await asyncio.wait({call}, timeout=5)
        assert call.done() and call.cancelled() is shutdown
        assert closed.is_set()  # the worker call was let go of either way
