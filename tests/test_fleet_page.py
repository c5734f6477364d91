"""The fleet page without Ray: the snapshot it shows (a pure function of a
status and the deployments), and its server on a real loopback port — the
JSON, the event stream, who may read (keys as a bearer header, a login's
cookie, ``?key=``), and the headers that keep a browser safe."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone

import httpx
import pytest
from pydantic import ValidationError

from actors.serving import HttpServer
from coordinator.control.fleet_page import FleetPage, Sessions, read_assets
from coordinator.core.config import CoordinatorConfig
from coordinator.core.deployments import DeploymentEvent, DeploymentStatus
from coordinator.core.fleet_page import fleet_snapshot
from coordinator.core.rollout import RolloutProgress
from coordinator.core.status import ClusterStatus, InstanceStatus, WatcherStatus
from coordinator.core.supervisor import LoopState

T0 = 1_780_000_000.0
KEY = "sk-page-test-0123456789"


def inst(model: str, port: int, *, wtype: str = "llm", healthy: bool = True, reachable: bool | None = True,
         error: str | None = None, in_flight: int = 0, draining: bool = False, weight: float = 1.0) -> InstanceStatus:
    return InstanceStatus(model=model, worker_type=wtype, host="127.0.0.1", port=port, registry_healthy=healthy,
                          reachable=reachable, probe_error=error, in_flight=in_flight, draining=draining,
                          weight=weight, last_heartbeat=datetime.fromtimestamp(T0 - 3, timezone.utc))


def a_status(**changes) -> ClusterStatus:
    fields = dict(
        name="fleet", namespace="prod",
        instances=[
            inst("chat", 18001, in_flight=3), inst("chat", 18002, draining=True, in_flight=1),
            inst("chat", 18003, reachable=False, error="Connection refused"),
            inst("embed", 18001, wtype="text2vec", weight=0.5),
            inst("WorkerManager", 18001, wtype="service"), inst("WorkerManager", 18002, wtype="service"),
            inst("WorkerManager", 18003, wtype="service", reachable=False, error="Connection refused"),
        ],
        watchers=[WatcherStatus(source="reg", kind="embedded", target="actor", version=7, instances=7, ready=True,
                                last_success=T0 - 1),
                  WatcherStatus(source="old", kind="dbgpt", target="http://10.0.0.5:8000", stale=True,
                                consecutive_failures=4, last_error="ConnectError: refused")],
        proxies=3, busy_keys=["chat@llm"], queued={"chat@llm": 2},
        rollouts=[RolloutProgress(key="chat@llm", batches=3, done=1, current=[("127.0.0.1", 18002)],
                                  phase="draining")],
        loops=[LoopState(name="resync", state="running", restarts=1, last_error="boom", last_error_at=T0 - 50),
               LoopState(name="gauges", state="running")],
        load_reporters=2, waiting={"cold@llm": 4},
    )
    fields.update(changes)
    return ClusterStatus(**fields)


def a_deployment(**changes) -> DeploymentStatus:
    fields = dict(
        model="chat", worker_type="llm", replicas=3, ready=2, instances=["127.0.0.1:18001", "127.0.0.1:18002"],
        state="degraded", last_error="startup failed: boom", generation=2, observed_generation=2,
        events=[DeploymentEvent(at=T0 - 30 + i, action="start", endpoint=f"127.0.0.1:{18001 + i}", reason="missing",
                                ok=i != 5, message="boom" if i == 5 else "") for i in range(7)],
    )
    fields.update(changes)
    return DeploymentStatus(**fields)


# ---- the snapshot ---------------------------------------------------------------


def test_the_snapshot_totals_what_the_header_shows():
    snap = fleet_snapshot(a_status(), [a_deployment()], T0)
    t = snap["totals"]
    # chat (3) and embed (1) instances; the draining and the unreachable ones are not healthy
    assert (t["models"], t["instances"], t["healthy"], t["draining"], t["in_flight"]) == (3, 4, 2, 1, 4)
    assert (t["hosts"], t["hosts_healthy"]) == (3, 2)
    assert (t["deployments"], t["deployments_ready"], t["running"], t["queued"]) == (1, 0, 1, 2)
    assert (t["watchers"], t["watchers_fresh"], t["waiting"], t["reporters"]) == (2, 1, 4, 2)


def test_models_list_their_instances_with_health_load_and_weight_worker_managers_last():
    snap = fleet_snapshot(a_status(), [a_deployment()], T0)
    assert [m["key"] for m in snap["models"]] == ["chat@llm", "cold@llm", "embed@text2vec", "WorkerManager@service"]
    chat = snap["models"][0]
    assert (chat["healthy"], chat["total"], chat["in_flight"], chat["draining"], chat["desired"]) == (1, 3, 4, 1, 3)
    rows = {r["endpoint"]: r for r in chat["instances"]}
    assert rows["127.0.0.1:18003"]["health"] == "unreachable"
    assert rows["127.0.0.1:18003"]["why"] == "unreachable: Connection refused"
    assert rows["127.0.0.1:18002"]["draining"] and rows["127.0.0.1:18001"]["in_flight"] == 3
    assert rows["127.0.0.1:18001"]["last_heartbeat"] == T0 - 3
    assert snap["models"][1]["instances"] == [] and snap["models"][1]["waiting"] == 4  # scaled to zero
    assert snap["models"][2]["instances"][0]["weight"] == 0.5
    unprobed = fleet_snapshot(a_status(instances=[inst("x", 1, reachable=None)], waiting={}), [], T0)
    assert unprobed["models"][0]["instances"][0]["health"] == "unprobed"


def test_deployments_show_their_last_events_newest_first():
    [d] = fleet_snapshot(a_status(), [a_deployment()], T0)["deployments"]
    assert (d["key"], d["ready"], d["replicas"], d["state"]) == ("chat@llm", 2, 3, "degraded")
    assert [e["at"] for e in d["events"]] == [T0 - 24, T0 - 25, T0 - 26, T0 - 27, T0 - 28]


def test_errors_put_what_is_wrong_now_first_then_failures_newest_first():
    errors = fleet_snapshot(a_status(), [a_deployment()], T0)["errors"]
    now = [e for e in errors if e["at"] is None]
    assert [e["where"] for e in now] == ["127.0.0.1:18003", "watcher old", "chat@llm"]  # one line per dead worker
    assert now[0]["message"] == "unreachable: Connection refused"
    past = errors[len(now):]
    assert [(e["where"], e["at"]) for e in past] == [("chat@llm", T0 - 25), ("loop resync", T0 - 50)]
    assert past[0]["message"] == "start 127.0.0.1:18006 failed: boom"


def test_a_fleet_where_nothing_happened_gives_the_same_snapshot_but_its_time():
    a = fleet_snapshot(a_status(), [a_deployment()], T0)
    b = fleet_snapshot(a_status(), [a_deployment()], T0 + 9)
    assert a != b and {**a, "at": 0} == {**b, "at": 0}
    json.dumps(a)  # JSON-ready as it is


# ---- the config -----------------------------------------------------------------

REG = [{"kind": "static", "instances": []}]


def test_the_page_beyond_loopback_needs_the_gateways_keys(tmp_path):
    with pytest.raises(ValidationError, match="page.host"):
        CoordinatorConfig.model_validate({"registries": REG, "page": {"host": "0.0.0.0"}})
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    config = CoordinatorConfig.model_validate({"registries": REG, "page": {"host": "0.0.0.0"},
                                               "gateway": {"api_keys": [{"file": str(keys)}]}})
    assert config.page_keys() == [KEY]
    assert CoordinatorConfig.model_validate({"registries": REG, "page": {"host": "0.0.0.0", "allow_open": True}})
    assert CoordinatorConfig.model_validate({"registries": REG}).page.enabled  # on by default, on loopback


# ---- the server -----------------------------------------------------------------


class FakeCoordinator:
    def __init__(self) -> None:
        self.status = a_status()
        self.built = 0
        self.change = asyncio.Event()

    async def snapshot(self) -> dict:
        self.built += 1
        return fleet_snapshot(self.status, [a_deployment()], T0 + self.built)

    async def changed(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.change.wait(), timeout)
        except TimeoutError:
            return False
        self.change.clear()
        return True


@pytest.fixture
async def served():
    servers = []

    async def serve(keys: list[str]) -> tuple[FakeCoordinator, str]:
        fake = FakeCoordinator()
        fake.page = FleetPage(fake.snapshot, fake.changed, keys)
        server = HttpServer(fake.page, "127.0.0.1", 0)
        await server.start()
        servers.append(server)
        return fake, server.url

    yield serve
    for server in servers:
        await server.stop()


async def events(response: httpx.Response):
    """The stream's events as (name, data), one at a time."""
    name, data = None, []
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and name:
            yield name, json.loads("".join(data))
            name, data = None, []


@pytest.mark.anyio
async def test_the_json_and_the_event_stream_follow_the_fleet(served):
    fake, url = await served([])  # no keys: open (the config allows that on loopback only)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        fleet = (await client.get("/api/fleet")).json()
        assert fleet["totals"]["instances"] == 4 and fleet["name"] == "fleet"
        async with client.stream("GET", "/api/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            stream = events(response)
            name, first = await anext(stream)
            assert name == "fleet" and first["totals"]["healthy"] == 2
            # A worker comes back: the next event says so, woken by the change.
            fake.status = a_status(instances=[i.model_copy(update={"reachable": True, "probe_error": None})
                                              for i in a_status().instances])
            fake.change.set()
            name, second = await asyncio.wait_for(anext(stream), 5)
            assert name == "fleet" and second["totals"]["healthy"] == 3
            # Nothing changes: only ticks (a snapshot equal but for its time is not sent again).
            name, tick = await asyncio.wait_for(anext(stream), 10)
            assert name == "tick" and set(tick) == {"at"}


@pytest.mark.anyio
async def test_readers_share_one_snapshot(served):
    fake, url = await served([])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await asyncio.gather(*(client.get("/api/fleet") for _ in range(20)))
    assert fake.built < 20


@pytest.mark.anyio
async def test_with_keys_only_a_known_key_or_a_session_reads(served):
    _, url = await served([KEY, "sk-another-key"])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        # The page itself carries no data: it loads without a key, and asks for one.
        page = await client.get("/")
        assert page.status_code == 200 and b'id="login"' in page.content
        for path in ("/api/fleet", "/api/events"):
            assert (await client.get(path)).status_code == 401
            assert (await client.get(path, headers={"authorization": "Bearer sk-wrong"})).status_code == 401
            assert (await client.get(path, headers={"authorization": f"Basic {KEY}"})).status_code == 401
        assert (await client.get("/api/fleet", headers={"authorization": f"Bearer {KEY}"})).status_code == 200
        async with client.stream("GET", "/api/events", headers={"authorization": "Bearer sk-another-key"}) as r:
            assert r.status_code == 200


@pytest.mark.anyio
async def test_a_login_sets_a_safe_cookie_that_holds_no_key(served):
    _, url = await served([KEY])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        bad = await client.post("/login", json={"key": "sk-wrong"})
        assert bad.status_code == 401 and not client.cookies
        assert (await client.post("/login", json={"key": ""})).status_code == 401
        assert (await client.post("/login", content=b"not json")).status_code == 401
        assert (await client.post("/login", content=b"x" * 10_000)).status_code == 413
        # from another site's page: refused, whatever the key
        assert (await client.post("/login", json={"key": KEY},
                                  headers={"origin": "http://evil.example"})).status_code == 403
        good = await client.post("/login", json={"key": KEY}, headers={"origin": url})
        assert good.status_code == 200
        cookie = good.headers["set-cookie"]
        port = url.rsplit(":", 1)[1]
        assert cookie.startswith(f"fleet_page_{port}=") and KEY not in cookie
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert (await client.get("/api/fleet")).status_code == 200
        # a cookie that was not issued here reads nothing
        token = client.cookies[f"fleet_page_{port}"]
        expires, _, sig = token.partition(".")
        for forged in (f"{int(expires) + 1}.{sig}", f"{expires}.{'0' * len(sig)}", "x"):
            client.cookies.set(f"fleet_page_{port}", forged)
            assert (await client.get("/api/fleet")).status_code == 401
        out = await client.post("/logout")  # the browser drops it
        assert out.status_code == 200
        assert out.headers["set-cookie"].startswith(f'fleet_page_{port}="";') and "Max-Age=0" in out.headers["set-cookie"]


@pytest.mark.anyio
async def test_a_key_in_the_address_becomes_a_cookie_and_leaves_the_address_bar(served):
    _, url = await served([KEY])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        wrong = await client.get("/", params={"key": "sk-wrong"})
        assert wrong.status_code == 200 and "set-cookie" not in wrong.headers
        right = await client.get("/", params={"key": KEY})
        assert right.status_code == 303 and right.headers["location"] == "/"
        assert (await client.get("/api/fleet")).status_code == 200


@pytest.mark.anyio
async def test_everything_it_serves_forbids_framing_and_other_origins(served):
    _, url = await served([KEY])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for path, kind in (("/", "text/html"), ("/fleet.css", "text/css"), ("/fleet.js", "text/javascript"),
                           ("/api/fleet", "application/json")):
            r = await client.get(path)
            if path != "/api/fleet":
                assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
            csp = r.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
        assert (await client.get("/nothing-here")).status_code == 404


def test_the_pages_files_come_with_the_package_and_fetch_nothing_elsewhere():
    assets = read_assets()
    assert set(assets) == {"/", "/fleet.css", "/fleet.js"}
    for body in assets.values():
        text = body.decode()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    assert ".innerHTML" not in assets["/fleet.js"].decode()  # shown as text, never as markup


def test_a_session_expires():
    now = [T0]
    sessions = Sessions(hours=1, clock=lambda: now[0])
    token = sessions.issue()
    assert sessions.valid(token)
    now[0] += 3601
    assert not sessions.valid(token)
    assert not Sessions(hours=1, clock=lambda: T0).valid(token)  # another server's (a restarted coordinator's)


@pytest.mark.anyio
async def test_an_open_page_on_loopback_answers_only_loopback_names(served):
    """DNS rebinding: another site's name pointed at 127.0.0.1 reaches the
    port, but says its own name in Host — an open page reads nothing to it."""
    _, url = await served([])
    port = url.rsplit(":", 1)[1]
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            assert (await client.get("/api/fleet", headers={"host": host})).status_code == 200
        for path in ("/api/fleet", "/api/events"):
            assert (await client.get(path, headers={"host": f"evil.example:{port}"})).status_code == 401


@pytest.mark.anyio
async def test_a_stream_a_session_opened_ends_with_the_session(served, monkeypatch):
    fake, url = await served([KEY])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        assert (await client.post("/login", json={"key": KEY})).status_code == 200
        page = fake.page
        async with client.stream("GET", "/api/events") as response:
            stream = events(response)
            name, _ = await anext(stream)
            assert name == "fleet"
            # The session runs out while the page stays open: the stream ends.
            monkeypatch.setattr(page._sessions, "_clock", lambda: time.time() + 10 * 86400)
            fake.change.set()
            with pytest.raises(StopAsyncIteration):
                while True:
                    await asyncio.wait_for(anext(stream), 10)
        assert (await client.get("/api/fleet")).status_code == 401  # and it is refused when it comes back
