"""The embedded registry's HTTP API facing the network: where it listens, who
may change it, and how much it accepts. Over real HTTP on loopback; the
registry runs on an event loop in a background thread so that hypothesis
(synchronous) can drive it."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actors.registry import EmbeddedRegistry
from coordinator.core.config import EmbeddedSource

TOKEN = "registry-token-4411"
ROUTES = [
    ("GET", "/api/health"),
    ("GET", "/api/controller/models"),
    ("POST", "/api/controller/models"),
    ("DELETE", "/api/controller/models"),
    ("POST", "/api/controller/heartbeat"),
]
WRITES = [r for r in ROUTES if r[0] != "GET"]


def instance(port=18001, **kw):
    return {"model_name": "chatgpt-test@llm", "host": "127.0.0.1", "port": port, "healthy": True, **kw}


class LiveRegistry:
    """An EmbeddedRegistry serving HTTP from its own thread's event loop."""

    def __init__(self, settings: EmbeddedSource) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make():
            reg = EmbeddedRegistry(settings)
            return reg, await reg.ready()

        self.registry, self.url = self.run(make())

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def state(self) -> list[dict]:
        return [i.model_dump(mode="json", exclude={"last_heartbeat"}) for i in self.run(self.registry.list_instances())]

    def close(self) -> None:
        self.run(self.registry.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("reg") / "token"
    token_file.write_text(TOKEN)
    live = LiveRegistry(EmbeddedSource(
        port=0, token={"file": str(token_file)}, max_instances=20, max_body_bytes=4096,
        heartbeat_interval=60, heartbeat_timeout=3600,  # no expiry during the tests
    ))
    with httpx.Client(base_url=live.url, timeout=5) as client:
        yield live, client
    live.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_listens_on_loopback_only_by_default():
    assert EmbeddedSource().host == "127.0.0.1"
    live = LiveRegistry(EmbeddedSource(port=0))
    try:
        port = int(live.url.rsplit(":", 1)[1])
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200
        # Another loopback address of this machine: nothing listens there.
        with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port), timeout=2):
            pass
    finally:
        live.close()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
@pytest.mark.parametrize(("method", "path"), WRITES)
def test_writes_without_the_token_get_401_and_change_nothing(guarded, headers, method, path):
    live, client = guarded
    before = live.state()
    params = {"model_name": "chatgpt-test@llm", "host": "127.0.0.1", "port": 18001} if method == "DELETE" else None
    r = client.request(method, path, json=None if method == "DELETE" else instance(port=18999),
                       params=params, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert live.state() == before


def test_writes_with_the_token_work_and_reads_stay_open(guarded):
    live, client = guarded
    assert client.post("/api/controller/models", json=instance(port=18101), headers=AUTH).json() is True
    assert client.post("/api/controller/heartbeat", json=instance(port=18101), headers=AUTH).json() is True
    listed = client.get("/api/controller/models").json()  # no token: DB-GPT's webserver reads without one
    assert 18101 in [i["port"] for i in listed]
    r = client.delete("/api/controller/models", headers=AUTH, params={
        "model_name": "chatgpt-test@llm", "host": "127.0.0.1", "port": 18101, "remove_from_registry": True})
    assert r.json() is True and 18101 not in [i["port"] for i in live.state()]


def test_an_oversized_body_gets_413_and_changes_nothing(guarded):
    live, client = guarded
    before = live.state()
    big = instance(port=18102, prompt_template="x" * 5000)
    assert client.post("/api/controller/models", json=big, headers=AUTH).status_code == 413

    def chunks():  # no content-length: counted as it arrives
        yield json.dumps(big).encode()

    r = client.post("/api/controller/models", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "4096" in r.json()["detail"]
    assert live.state() == before


def test_the_instance_limit_gets_409_and_known_entries_still_refresh(guarded):
    live, client = guarded
    ports = iter(range(18200, 18300))
    while len(live.state()) < 20:
        assert client.post("/api/controller/models", json=instance(port=next(ports)), headers=AUTH).status_code == 200
    before = live.state()
    r = client.post("/api/controller/models", json=instance(port=19999), headers=AUTH)
    assert r.status_code == 409 and "limit of 20" in r.json()["detail"]
    assert live.state() == before
    held = before[0]["port"]
    assert client.post("/api/controller/heartbeat", json=instance(port=held), headers=AUTH).status_code == 200
    for entry in live.state():  # make room again for the other tests
        client.delete("/api/controller/models", headers=AUTH, params={
            "model_name": entry["model_name"], "host": entry["host"], "port": entry["port"],
            "remove_from_registry": True})


@pytest.mark.parametrize(
    "body",
    [instance(model_name="m" * 300), instance(host="evil.com/x?"), instance(host="user@host"),
     instance(port=0), instance(port=True), instance(port=70000)],
)
def test_invalid_entries_get_422_naming_the_field_without_echoing_it(guarded, body):
    live, client = guarded
    before = live.state()
    r = client.post("/api/controller/models", json=body, headers=AUTH)
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"][0] == "body" and "input" not in error
    assert live.state() == before


NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | NON_FINITE | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
FIELD_VALUES = st.one_of(JSON, st.text(max_size=300), st.integers(min_value=-(2**70), max_value=2**70))
MUTATED = st.fixed_dictionaries(
    {}, optional={k: FIELD_VALUES for k in ("model_name", "host", "port", "healthy", "weight",
                                            "check_healthy", "last_heartbeat", "enabled", "prompt_template")}
).map(lambda changes: {**instance(port=18400), **changes})
BODIES = st.one_of(
    MUTATED.map(lambda d: json.dumps(d).encode()),
    JSON.map(lambda d: json.dumps(d).encode()),  # including NaN and Infinity
    st.binary(max_size=300),
    st.just(b"9" * 5000),  # over the limit
)
QUERIES = st.dictionaries(
    st.sampled_from(["model_name", "host", "port", "healthy_only", "remove_from_registry"]) | st.text(max_size=8),
    st.text(max_size=40) | st.integers().map(str) | st.sampled_from(["true", "false", "127.0.0.1"]),
    max_size=5,
)


@pytest.mark.parametrize("body", [b"NaN", b"Infinity", b'{"model_name": "m@llm", "host": "h", "port": NaN}',
                                  b'[1, -Infinity]', b"\xff\xfe", b"{"])
def test_bodies_fastapi_cannot_echo_get_a_422_not_a_500(guarded, body):
    # FastAPI's own 422 handler echoes the input and fails on NaN/Infinity.
    _, client = guarded
    r = client.post("/api/controller/models", content=body, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(route=("POST", "/api/controller/heartbeat"), body=b'{"port": Infinity}', query={}, authorised=True)
@given(route=st.sampled_from(ROUTES), body=BODIES, query=QUERIES, authorised=st.booleans())
def test_arbitrary_requests_never_get_a_5xx_or_change_state_unless_accepted(guarded, route, body, query, authorised):
    live, client = guarded
    method, path = route
    before = live.state()
    headers = {"content-type": "application/json", **(AUTH if authorised else {})}
    r = client.request(method, path, content=body, params=query, headers=headers)
    assert 200 <= r.status_code < 500, (r.status_code, r.text[:200])
    if not (r.is_success and method != "GET"):
        assert live.state() == before
    assert client.get("/api/health").status_code == 200
    for entry in live.state():  # start each example from an empty registry
        live.run(live.registry.deregister(entry["model_name"], entry["host"], entry["port"], True))


def test_the_registry_can_serve_https_so_its_token_is_not_sent_in_clear(tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "token").write_text(TOKEN)
    live = LiveRegistry(EmbeddedSource(port=0, token={"file": str(tmp_path / "token")},
                                       tls={"cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}))
    try:
        assert live.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with httpx.Client(base_url=live.url, verify=trust, timeout=5) as client:
            assert client.post("/api/controller/models", json=instance(), headers=AUTH).json() is True
            assert [i["port"] for i in client.get("/api/controller/models").json()] == [18001]
        with pytest.raises(httpx.HTTPError):  # plain http to the https port gets nowhere
            httpx.get(live.url.replace("https://", "http://") + "/api/health", timeout=5)
    finally:
        live.close()
