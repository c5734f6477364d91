"""The coordinator's logic with in-process links: no Ray, no HTTP."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from coordinator.core.config import CoordinatorConfig
from coordinator.core.errors import ModelBusyError, NoInstancesError, UnknownEndpointError, WaitTimeoutError
from coordinator.core.liveset import Snapshot
from coordinator.core.models import (
    Endpoint,
    ModelInstance,
    SupportsOutcome,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
)
from coordinator.core.rollout import ApplyOptions
from coordinator.control.service import CoordinatorService, LinkError
from coordinator.core.status import WatcherStatus

pytestmark = pytest.mark.anyio


def inst(key: str, port: int, healthy: bool = True) -> ModelInstance:
    return ModelInstance(model_name=key, host="h", port=port, healthy=healthy)


class FakeWatchers:
    def __init__(self) -> None:
        self.snapshots: dict[str, Snapshot] = {}
        self.changed = asyncio.Event()
        self.dead: set[str] = set()
        self.silent = False  # True: not even a first answer (a watcher still starting)

    def publish(self, source: str, *instances: ModelInstance) -> None:
        old = self.snapshots.get(source)
        self.snapshots[source] = Snapshot("e", (old.version if old else 0) + 1, instances)
        self.changed.set()
        self.changed = asyncio.Event()

    async def listen(self, source, since, timeout):
        if source in self.dead:
            raise LinkError("watcher died")
        snap = self.snapshots.get(source)
        if snap is None and since is None and not self.silent:
            return Snapshot("e", 0, ())  # a watcher answers its first listen, even with nothing
        if snap is not None and since != (snap.epoch, snap.version):
            return snap
        try:
            await asyncio.wait_for(self.changed.wait(), timeout)
        except TimeoutError:
            pass
        return None

    async def status(self, source):
        if source in self.dead:
            raise LinkError("watcher died")
        return WatcherStatus(source=source, kind="static", target="t")


class FakeProxies:
    def __init__(self) -> None:
        self.live: set[Endpoint] = set()
        self.created: list[Endpoint] = []
        self.retired: list[Endpoint] = []
        self.calls: list[tuple[Endpoint, str, Any]] = []
        self.behaviour: dict[Endpoint, Any] = {}
        self.access: dict[Endpoint, Any] = {}
        self.probes: dict[Endpoint, Any] = {}  # what probe_now finds, when not "reachable"
        self.delay = 0.0

    def endpoints(self):
        return set(self.live)

    def ensure(self, ep, access):
        self.live.add(ep)
        self.created.append(ep)
        self.access[ep] = access

    def retire(self, ep):
        self.live.discard(ep)
        self.retired.append(ep)

    async def call(self, ep, method, *args, deadline):
        self.calls.append((ep, method, args[0] if args else None))
        await asyncio.sleep(self.delay)
        if self.behaviour.get(ep) == "dead":
            raise LinkError("proxy actor died mid-call")
        if method == "supports":
            return SupportsOutcome(endpoint=ep)
        if method == "probe_now":
            return self.probes.get(ep, SimpleNamespace(reachable=True, last_error=None, consecutive_failures=0))
        return WorkerApplyOutput(message=f"{ep} {method} ok", success=True, host=ep.host, port=ep.port)


class FakeRegistries:
    """Embedded registries: what they were told, and when they last listed an instance."""

    present = True

    def __init__(self, told: list | None = None, quiet: float | None = None) -> None:
        self.told = told if told is not None else []
        self.drained: list[frozenset] = []
        self.quiet = quiet

    def tell(self, unreachable, draining=frozenset()):
        self.told.append(unreachable)
        self.drained.append(draining)

    async def quiet_for(self, instances):
        return self.quiet


@pytest.fixture
async def service():
    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}, {"kind": "static", "name": "b", "instances": []}],
         "backoff": {"initial": 0.01, "maximum": 0.05}, "long_poll_timeout": 0.2}
    )
    watchers, proxies = FakeWatchers(), FakeProxies()
    svc = CoordinatorService(config, watchers, proxies)
    task = asyncio.create_task(svc.run())
    yield svc, watchers, proxies
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def settle(svc: CoordinatorService, count: int, model: str = "m") -> None:
    await svc.wait_for(model, count, timeout=5)


async def test_apply_reaches_every_registered_instance_and_reports_each(service):
    svc, watchers, proxies = service
    watchers.publish("a", inst("m@llm", 1), inst("m@llm", 2, healthy=False), inst("other@llm", 3))
    watchers.publish("b", inst("m@llm", 4))
    await settle(svc, 2)
    result = await svc.apply(WorkerApplyRequest(model="m", apply_type="start"))
    assert [o.port for o in result.outputs] == [1, 2, 4]
    assert result.output.success
    assert {c[0].port for c in proxies.calls} == {1, 2, 4}


async def test_a_dead_proxy_is_that_instances_failure_only(service):
    svc, watchers, proxies = service
    watchers.publish("a", inst("m@llm", 1), inst("m@llm", 2))
    await settle(svc, 2)
    proxies.behaviour[Endpoint("h", 2)] = "dead"
    result = await svc.apply(WorkerApplyRequest(model="m", apply_type="restart"))
    assert [o.success for o in result.outputs] == [True, False]
    assert "h:2: apply restart m@llm failed: proxy actor died" in result.outputs[1].message
    assert result.output.success is False


async def test_apply_to_an_unlisted_model_raises(service):
    svc, watchers, _ = service
    watchers.publish("a", inst("m@llm", 1))
    await settle(svc, 1)
    with pytest.raises(NoInstancesError, match="ghost@llm"):
        await svc.apply(WorkerApplyRequest(model="ghost", apply_type="start"))


async def test_startup_to_an_unlisted_endpoint_raises_and_sends_nothing(service):
    svc, watchers, proxies = service
    watchers.publish("a", inst("WorkerManager@service", 1))
    await svc.wait_for("WorkerManager", 1, worker_type="service", timeout=5)
    with pytest.raises(UnknownEndpointError, match="h:9"):
        await svc.startup(WorkerStartupRequest(host="h", port=9, model="n", worker_type="llm"))
    assert proxies.calls == []
    out = await svc.startup(WorkerStartupRequest(host="h", port=1, model="n", worker_type="llm"))
    assert out.success and proxies.calls[0][:2] == (Endpoint("h", 1), "startup")


async def test_operations_on_one_model_are_serialised_and_others_overlap(service):
    svc, watchers, proxies = service
    watchers.publish("a", inst("m@llm", 1), inst("n@llm", 2))
    await settle(svc, 1)
    proxies.delay = 0.05
    order: list[str] = []

    async def run(model: str, kind: str) -> None:
        await svc.apply(WorkerApplyRequest(model=model, apply_type=kind))
        order.append(f"{model}:{kind}")

    async with asyncio.TaskGroup() as tg:
        for kind in ("stop", "start", "restart"):
            tg.create_task(run("m", kind))
            await asyncio.sleep(0)
        tg.create_task(run("n", "restart"))
    assert [x for x in order if x.startswith("m:")] == ["m:stop", "m:start", "m:restart"]
    assert order.index("n:restart") < order.index("m:restart")  # not queued behind m


async def test_proxies_follow_the_endpoints_the_registries_list(service):
    svc, watchers, proxies = service
    watchers.publish("a", inst("m@llm", 1), inst("WorkerManager@service", 1), inst("m@llm", 2))
    await settle(svc, 2)
    assert proxies.live == {Endpoint("h", 1), Endpoint("h", 2)}
    watchers.publish("a", inst("m@llm", 1))
    await asyncio.wait_for(_until(lambda: proxies.retired == [Endpoint("h", 2)]), 5)
    assert proxies.created.count(Endpoint("h", 1)) == 1


async def test_a_dead_watcher_keeps_its_last_snapshot(service):
    svc, watchers, _ = service
    watchers.publish("a", inst("m@llm", 1))
    watchers.publish("b", inst("m@llm", 2))
    await settle(svc, 2)
    watchers.dead.add("b")
    watchers.publish("a", inst("m@llm", 1), inst("m@llm", 3))
    await settle(svc, 3)
    assert {i.port for i in await svc.instances("m")} == {1, 2, 3}
    status = await svc.status()
    assert [w.stale for w in status.watchers] == [False, True]


async def test_unreachable_workers_leave_the_healthy_set_and_status_says_why(service):
    svc, watchers, _ = service
    watchers.publish("a", inst("m@llm", 1), inst("m@llm", 2))
    await settle(svc, 2)

    class Dead:
        reachable, last_error = False, "Connection refused"

    await svc.report_probe(Endpoint("h", 2), Dead())
    assert [i.port for i in await svc.instances("m")] == [1]
    assert len(await svc.instances("m", healthy_only=False)) == 2
    row = [r for r in (await svc.status()).instances if r.port == 2][0]
    assert row.why_unhealthy == "unreachable: Connection refused"


async def test_wait_for_gives_up_with_a_count(service):
    svc, watchers, _ = service
    watchers.publish("a", inst("m@llm", 1))
    with pytest.raises(WaitTimeoutError, match="1 of 2"):
        await svc.wait_for("m", 2, timeout=0.2)


async def _until(cond) -> None:
    while not cond():
        await asyncio.sleep(0.01)


# ---- rolling operations -------------------------------------------------

from pydantic import ValidationError  # noqa: E402

from coordinator.core.rollout import ApplyPlan, plan_batches  # noqa: E402


def test_batches_are_all_at_once_by_default_and_at_most_k_otherwise():
    eps = [Endpoint("h", p) for p in range(1, 6)]
    assert plan_batches(eps, None) == [eps]
    assert [len(b) for b in plan_batches(eps, 2)] == [2, 2, 1]
    assert plan_batches(eps, 9) == [eps]
    with pytest.raises(ValueError):
        plan_batches(eps, 0)


@pytest.mark.parametrize("kind", ["start", "stop"])
def test_only_restart_and_update_params_can_roll(kind):
    with pytest.raises(ValidationError, match="max_unavailable"):
        ApplyOptions(apply_type=kind, max_unavailable=1)
    with pytest.raises(ValidationError):
        ApplyOptions(apply_type="restart", max_unavailable=0)


async def test_dry_run_returns_the_plan_and_sends_nothing(service):
    svc, watchers, proxies = service
    watchers.publish("a", *(inst("m@llm", p) for p in range(1, 6)))
    await settle(svc, 5)
    req = WorkerApplyRequest(model="m", apply_type="restart")
    plan = await svc.apply(req, ApplyOptions(apply_type="restart", max_unavailable=2, dry_run=True))
    assert isinstance(plan, ApplyPlan)
    assert plan.batches == [[("h", 1), ("h", 2)], [("h", 3), ("h", 4)], [("h", 5)]]
    assert proxies.calls == []


async def test_a_rollout_goes_batch_by_batch(service):
    svc, watchers, proxies = service
    watchers.publish("a", *(inst("m@llm", p) for p in range(1, 6)))
    await settle(svc, 5)
    proxies.delay = 0.02
    result = await svc.apply(WorkerApplyRequest(model="m", apply_type="restart"),
                             ApplyOptions(apply_type="restart", max_unavailable=2))
    assert result.success and [o.port for o in result.outputs] == [1, 2, 3, 4, 5]
    applies = [c for c in proxies.calls if c[1] == "apply"]
    batches_seen = [sorted(c[0].port for c in applies[i:i + 2]) for i in (0, 2)]
    assert batches_seen == [[1, 2], [3, 4]]


async def test_a_rollout_stops_at_the_first_failed_batch(service):
    svc, watchers, proxies = service
    watchers.publish("a", *(inst("m@llm", p) for p in range(1, 6)))
    await settle(svc, 5)
    proxies.behaviour[Endpoint("h", 3)] = "dead"
    result = await svc.apply(WorkerApplyRequest(model="m", apply_type="restart"),
                             ApplyOptions(apply_type="restart", max_unavailable=2))
    assert len(result.outputs) == 5  # every instance accounted for
    assert [o.success for o in result.outputs] == [True, True, False, True, False]
    assert "not attempted: batch 2 of 3 failed" in result.outputs[-1].message
    assert {c[0].port for c in proxies.calls if c[1] == "apply"} == {1, 2, 3, 4}


async def test_a_batch_that_does_not_come_back_healthy_stops_the_rollout(service):
    svc, watchers, proxies = service
    watchers.publish("a", inst("m@llm", 1), inst("m@llm", 2, healthy=False))
    await settle(svc, 1)
    result = await svc.apply(WorkerApplyRequest(model="m", apply_type="restart"),
                             ApplyOptions(apply_type="restart", max_unavailable=1, health_timeout=0.5))
    # batch 1 is port 1 (healthy) and passes; batch 2 is port 2, the last: nothing after it
    assert [o.success for o in result.outputs] == [True, True]
    watchers.publish("a", inst("m@llm", 1, healthy=False), inst("m@llm", 2))
    await settle(svc, 1)
    result = await svc.apply(WorkerApplyRequest(model="m", apply_type="restart"),
                             ApplyOptions(apply_type="restart", max_unavailable=1, health_timeout=0.5))
    assert result.outputs[0].success
    assert "not attempted: batch 1 not healthy within 0.5 s" in result.outputs[1].message


class RecordingMetrics:
    def __init__(self) -> None:
        self.live: list[tuple[dict, set[str] | None]] = []

    def live_instances(self, counts, models=None):
        self.live.append((dict(counts), None if models is None else set(models)))

    def __getattr__(self, name):  # every other metric: ignored
        return lambda *args, **kwargs: None


async def test_a_change_recounts_the_gauges_of_the_models_it_touched_only(monkeypatch):
    import coordinator.control.service as service_module

    monkeypatch.setattr(service_module, "GAUGE_INTERVAL", 0.01)
    metrics = RecordingMetrics()
    async with running(metrics=metrics) as (svc, watchers, _):
        watchers.publish("a", inst("m@llm", 1), inst("n@llm", 1), inst("n@llm", 2))
        await settle(svc, 2, "n")
        await asyncio.sleep(0.05)
        metrics.live.clear()
        watchers.publish("a", inst("m@llm", 1), inst("n@llm", 1), inst("n@llm", 2, healthy=False))
        await eventually(lambda: metrics.live, "gauges recorded")
        counts, models = metrics.live[0]
        assert models == {"n@llm"}  # m@llm did not change: not counted again
        assert counts == {("n@llm", "healthy"): 1, ("n@llm", "unhealthy"): 1}


class TimedProxies(FakeProxies):
    """Records when each worker call started and ended (loop time)."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[tuple[float, float, Any]] = []

    async def call(self, ep, method, *args, deadline):
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await super().call(ep, method, *args, deadline=deadline)
        finally:
            self.spans.append((started, loop.time(), args[0]))


@asynccontextmanager
async def running(proxies: FakeProxies | None = None, metrics: Any = None, **settings: Any):
    """A service following one static source that lists m@llm on h:1 and h:2,
    with ``settings`` on top of the test config; yields (service, watchers, proxies)."""
    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2,
         "change_pace": 0, **settings})
    watchers, proxies = FakeWatchers(), proxies or FakeProxies()
    svc = CoordinatorService(config, watchers, proxies, metrics=metrics)
    run = asyncio.create_task(svc.run())
    try:
        watchers.publish("a", inst("m@llm", 1), inst("m@llm", 2))
        await settle(svc, 2)
        yield svc, watchers, proxies
    finally:
        run.cancel()


async def eventually(condition, what: str = "", timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def status_until(svc: CoordinatorService, condition, what: str = ""):
    """The service's status, once ``condition(status)`` holds (within 5 s)."""
    deadline = asyncio.get_running_loop().time() + 5
    while not condition(status := await svc.status()):
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)
    return status


def sent(proxies: FakeProxies, apply_type: str) -> list[Endpoint]:
    """Endpoints an apply of ``apply_type`` has reached (calls are recorded as they begin)."""
    return [c[0] for c in proxies.calls if c[1] == "apply" and f'"{apply_type}"' in c[2]]


async def calls_running(proxies: FakeProxies, apply_type: str) -> None:
    """Until the apply's worker calls to both instances have begun: it holds the model's turn."""
    await eventually(lambda: sorted(ep.port for ep in sent(proxies, apply_type)) == [1, 2],
                     f"the {apply_type}'s worker calls running")


async def test_a_caller_that_gives_up_leaves_the_operation_its_models_turn():
    """The first apply's caller is cancelled (a driver that gave up) while its
    worker calls run; the next apply on the model starts none of its calls
    until those have ended."""
    async with running(TimedProxies()) as (svc, _, proxies):
        proxies.delay = 0.5
        first = asyncio.ensure_future(svc.apply(WorkerApplyRequest(model="m", apply_type="restart")))
        await calls_running(proxies, "restart")
        first.cancel()
        second = await svc.apply(WorkerApplyRequest(model="m", apply_type="start"))
        assert second.output.success
        restarts = [s for s in proxies.spans if '"restart"' in s[2]]
        starts = [s for s in proxies.spans if '"start"' in s[2]]
        assert len(restarts) == 2 and len(starts) == 2  # the first ran to its end regardless
        assert min(s[0] for s in starts) >= max(s[1] for s in restarts)


async def test_a_dry_run_is_answered_while_an_operation_holds_the_model():
    async with running() as (svc, _, proxies):
        proxies.delay = 5
        busy = asyncio.ensure_future(svc.apply(WorkerApplyRequest(model="m", apply_type="restart")))
        await calls_running(proxies, "restart")
        assert (await svc.status()).busy_keys == ["m@llm"]
        plan = await asyncio.wait_for(
            svc.apply(WorkerApplyRequest(model="m", apply_type="restart"),
                      ApplyOptions(apply_type="restart", max_unavailable=1, dry_run=True)), 2)
        assert plan.batches == [[("h", 1)], [("h", 2)]] and not busy.done()
        busy.cancel()


async def test_an_operation_whose_callers_deadline_passed_in_the_queue_sends_nothing():
    async with running(TimedProxies()) as (svc, _, proxies):
        proxies.delay = 0.6
        first = asyncio.ensure_future(svc.apply(WorkerApplyRequest(model="m", apply_type="restart")))
        await calls_running(proxies, "restart")
        late = await svc.apply(WorkerApplyRequest(model="m", apply_type="start"),
                               ApplyOptions(apply_type="start", timeout=0.3))
        assert [o.success for o in late.outputs] == [False, False]
        assert all("not sent: the caller's deadline passed" in o.message for o in late.outputs)
        await first
        assert not any('"start"' in s[2] for s in proxies.spans)


async def test_a_flood_of_one_restart_is_carried_out_once_more_and_distinct_excess_is_refused():
    async with running(TimedProxies(), max_queued_operations=2) as (svc, _, proxies):
        proxies.delay = 0.3
        first = asyncio.ensure_future(svc.apply(WorkerApplyRequest(model="m", apply_type="restart")))
        await calls_running(proxies, "restart")  # running, so the flood cannot join it
        flood = [asyncio.ensure_future(svc.apply(WorkerApplyRequest(model="m", apply_type="restart")))
                 for _ in range(60)]
        other = asyncio.ensure_future(svc.apply(
            WorkerApplyRequest(model="m", apply_type="update_params", params={"temperature": 0.1})))
        # The update was asked last (tasks start in order): once two distinct
        # operations wait, every caller has been queued, joined or refused.
        status = await status_until(svc, lambda st: st.queued.get("m@llm", 0) >= 2, "two operations waiting")
        assert status.queued == {"m@llm": 2} and status.busy_keys == ["m@llm"]
        assert not any(f.done() for f in [*flood, other])  # none was refused
        with pytest.raises(ModelBusyError, match=r"m@llm is busy: 2 distinct operations"):
            await svc.apply(WorkerApplyRequest(model="m", apply_type="stop"))
        results = await asyncio.gather(first, *flood, other)
        assert all(r.output.success for r in results)
        assert len(proxies.spans) == 3 * 2  # three operations, two instances each: not 62


async def test_a_periodic_resync_repairs_drift_between_the_live_set_and_the_proxies():
    async with running(resync_interval=0.05) as (_, _, proxies):
        proxies.live.discard(Endpoint("h", 2))  # a proxy lost behind the coordinator's back
        proxies.live.add(Endpoint("h", 9))  # and one nobody lists any more
        await eventually(lambda: proxies.live == {Endpoint("h", 1), Endpoint("h", 2)}, "drift repaired")
        assert Endpoint("h", 9) in proxies.retired


async def test_the_health_gate_needs_evidence_from_after_the_batch(service):
    """The registry still calls the batch healthy and the last word from its
    proxy was "reachable" — from before the restart. The probe made after the
    batch fails: the gate holds until a probe says the worker answers again
    (it went down and came back), and only then does the next batch go."""
    svc, watchers, proxies = service
    watchers.publish("a", inst("m@llm", 1), inst("m@llm", 2))
    await settle(svc, 2)
    await svc.report_probe(Endpoint("h", 1), SimpleNamespace(reachable=True, last_error=None))  # old news
    proxies.probes[Endpoint("h", 1)] = SimpleNamespace(reachable=True, last_error="refused", consecutive_failures=1)
    rollout = asyncio.ensure_future(svc.apply(
        WorkerApplyRequest(model="m", apply_type="restart"),
        ApplyOptions(apply_type="restart", max_unavailable=1, health_timeout=5)))
    await asyncio.sleep(0.3)
    assert not rollout.done()  # held: the fresh probe did not get through
    assert [c[0].port for c in proxies.calls if c[1] == "apply"] == [1]
    await svc.report_probe(Endpoint("h", 1), SimpleNamespace(reachable=False, last_error="refused"))
    await asyncio.sleep(0.1)
    assert not rollout.done()
    await svc.report_probe(Endpoint("h", 1), SimpleNamespace(reachable=True, last_error=None))  # back
    result = await asyncio.wait_for(rollout, 5)
    assert result.success and [o.port for o in result.outputs] == [1, 2]


async def test_right_after_a_start_operations_wait_for_the_live_set_instead_of_calling_it_empty():
    """A restarted coordinator's live set is empty until its watchers answer:
    an apply made then waits for them, rather than saying no registry lists
    the model."""
    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2})
    watchers, proxies = FakeWatchers(), FakeProxies()
    watchers.silent = True
    svc = CoordinatorService(config, watchers, proxies)
    run = asyncio.create_task(svc.run())
    try:
        early = asyncio.ensure_future(svc.apply(WorkerApplyRequest(model="m", apply_type="start")))
        await asyncio.sleep(0.2)
        assert not early.done()
        watchers.silent = False
        watchers.publish("a", inst("m@llm", 1))
        assert (await asyncio.wait_for(early, 5)).output.success
    finally:
        run.cancel()


async def test_the_route_table_holds_healthy_enabled_reachable_instances_and_tells_registries(service):
    _, watchers, proxies = service
    told = []
    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2})
    svc = CoordinatorService(config, watchers, proxies, registries=FakeRegistries(told))
    run = asyncio.create_task(svc.run())
    watchers.publish("a", inst("m@llm", 1), inst("m@llm", 2, healthy=False), inst("WorkerManager@service", 1),
                     ModelInstance(model_name="m@llm", host="h", port=3, healthy=True, enabled=False),
                     ModelInstance(model_name="m@llm", host="h", port=4, healthy=True, weight=3.0))
    await settle(svc, 3)
    change = await svc.routes_since(None, timeout=1)
    assert sorted((r.port, r.weight) for r in change.instances) == [(1, 1.0), (4, 3.0)]  # no manager, none disabled

    # The probes find port 4 unreachable: its route goes, the registries hear it.
    await svc.report_probe(Endpoint("h", 4), SimpleNamespace(reachable=False, last_error="refused"))
    delta = await svc.routes_since((change.epoch, change.version), timeout=1)
    assert [tuple(k) for k in delta.removed] == [("m@llm", "h", 4)] and not delta.upserts
    assert told[-1] == frozenset({Endpoint("h", 4)})
    await svc.report_probe(Endpoint("h", 4), SimpleNamespace(reachable=True, last_error=None))
    back = await svc.routes_since((delta.epoch, delta.version), timeout=1)
    assert [u.port for u in back.upserts] == [4] and told[-1] == frozenset()
    assert await svc.routes_since((back.epoch, back.version), timeout=0.1) is None  # long poll: nothing new
    run.cancel()


async def test_a_restart_drains_first_it_leaves_the_routes_and_waits_for_what_callers_have_in_flight():
    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2,
         "drain": {"timeout": 20, "grace": 0}, "caller": {"report_ttl": 60}})  # no report expires here
    watchers, proxies, registries = FakeWatchers(), FakeProxies(), FakeRegistries()
    svc = CoordinatorService(config, watchers, proxies, registries=registries)
    run = asyncio.create_task(svc.run())
    watchers.publish("a", inst("m@llm", 1), inst("m@llm", 2))
    await settle(svc, 2)
    routes = await svc.routes_since(None, timeout=1)
    at = (routes.epoch, routes.version)
    svc.report_load("gw-1", 1, {("m@llm", "h", 1): 2, ("m@llm", "h", 2): 1}, applied=at)
    svc.report_load("driver", 1, {("m@llm", "h", 1): 1}, applied=at)

    async def draining(port: int) -> tuple[str, int]:
        """Until port's instance is draining; the route table's position then."""
        while svc.view.draining() != {("m@llm", "h", port)}:
            await asyncio.sleep(0.01)
        return svc.view.routes.position

    def applied() -> bool:
        return any(m == "apply" for _, m, _ in proxies.calls)

    req = WorkerApplyRequest(model="m", apply_type="restart")
    started = asyncio.get_running_loop().time()
    rolling = asyncio.create_task(svc.apply(req, ApplyOptions(apply_type="restart", max_unavailable=1)))
    mark = await asyncio.wait_for(draining(1), 5)
    delta = await svc.routes_since(at, timeout=2)
    assert [tuple(k) for k in delta.removed] == [("m@llm", "h", 1)]  # out of every router's table first
    assert registries.drained[-1] == frozenset({("m@llm", "h", 1)})  # and listed unhealthy
    assert [r.port for r in (await svc.status()).instances if r.draining] == [1]
    svc.report_load("gw-1", 2, {("m@llm", "h", 2): 1}, applied=mark)  # its requests on port 1 ended
    await asyncio.sleep(0.3)
    assert not applied()  # the driver's one is still going
    svc.report_load("driver", 2, {}, applied=at)  # ended, but it has not taken the new table yet:
    await asyncio.sleep(0.3)  # it may have chosen port 1 just now, and that report be on its way
    assert not applied()
    svc.report_load("driver", 3, {}, applied=mark)
    mark2 = await asyncio.wait_for(draining(2), 5)  # port 1 restarted and healthy: now port 2
    assert [ep.port for ep, m, _ in proxies.calls if m == "apply"] == [1]
    await asyncio.sleep(0.3)
    assert [ep.port for ep, m, _ in proxies.calls if m == "apply"] == [1]  # gw-1's request on port 2
    svc.report_load("gw-1", 3, {}, applied=mark2)
    svc.report_load("driver", 4, {}, applied=mark2)
    result = await asyncio.wait_for(rolling, 10)
    assert asyncio.get_running_loop().time() - started < 10  # settled by the reports, not a timeout
    assert [o.port for o in result.outputs] == [1, 2]
    assert all("drained in" in o.message and "0 in flight" in o.message for o in result.outputs)
    assert registries.drained[-1] == frozenset()  # both back
    assert not any(r.draining for r in (await svc.status()).instances)
    run.cancel()


async def test_a_drain_that_times_out_goes_on_and_says_how_many_were_left_and_a_dead_caller_does_not_hold_it():
    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2,
         "drain": {"timeout": 30, "grace": 0}, "caller": {"report_every": 0.2, "report_ttl": 1.0}})
    watchers, proxies = FakeWatchers(), FakeProxies()
    svc = CoordinatorService(config, watchers, proxies, registries=FakeRegistries())
    run = asyncio.create_task(svc.run())
    watchers.publish("a", inst("m@llm", 1))
    await settle(svc, 1)
    svc.report_load("stuck", 1, {("m@llm", "h", 1): 2}, applied=svc.view.routes.position)

    stop = WorkerApplyRequest(model="m", apply_type="stop")
    [out] = (await svc.apply(stop, ApplyOptions(apply_type="stop", drain_timeout=0.5))).outputs
    assert out.success and "drain timed out after" in out.message and "2 request(s) still in flight" in out.message

    svc.report_load("dies", 1, {("m@llm", "h", 1): 1}, applied=svc.view.routes.position)  # ... never again
    started = asyncio.get_running_loop().time()
    [out] = (await svc.apply(stop, ApplyOptions(apply_type="stop"))).outputs
    assert "0 in flight" in out.message  # its count expired after report_ttl: not the 30 s timeout
    assert asyncio.get_running_loop().time() - started < 10
    run.cancel()


async def test_the_grace_waits_for_readers_that_report_nothing_and_costs_nothing_when_none_read():
    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2,
         "drain": {"timeout": 30, "grace": 1.0}})
    watchers, proxies = FakeWatchers(), FakeProxies()
    registries = FakeRegistries(quiet=None)  # no reader ever listed it
    svc = CoordinatorService(config, watchers, proxies, registries=registries)
    run = asyncio.create_task(svc.run())
    watchers.publish("a", inst("m@llm", 1))
    await settle(svc, 1)
    loop = asyncio.get_running_loop()
    stop = WorkerApplyRequest(model="m", apply_type="stop")
    started = loop.time()
    await svc.apply(stop, ApplyOptions(apply_type="stop"))
    assert loop.time() - started < 0.8
    registries.quiet = 0.2  # DB-GPT's API server was shown it 0.2 s ago
    started = loop.time()
    [out] = (await svc.apply(stop, ApplyOptions(apply_type="stop"))).outputs
    assert 0.7 <= loop.time() - started < 5 and "drained in" in out.message
    # Operations that take nothing out of service are not drained.
    start = WorkerApplyRequest(model="m", apply_type="start")
    [out] = (await svc.apply(start, ApplyOptions(apply_type="start"))).outputs
    assert "drain" not in out.message
    run.cancel()


async def test_a_scale_down_right_after_a_drivers_restart_settles_at_once():
    """A driver's restart leaves its instances "coming back" for
    reconcile.appear_within; the keeper's stop of one of them clears that, so
    the stopped one is not counted as starting (the deploy below would wait
    the whole 60 s)."""
    from coordinator.core.deployments import Deployment

    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2,
         "drain": {"grace": 0}, "reconcile": {"appear_within": 60}})
    watchers, proxies = FakeWatchers(), FakeProxies()
    svc = CoordinatorService(config, watchers, proxies, registries=FakeRegistries())
    run = asyncio.create_task(svc.run())
    fleet = {p: [inst("m@llm", p), inst("WorkerManager@service", p)] for p in (1, 2)}
    watchers.publish("a", *(i for p in fleet for i in fleet[p]))
    await settle(svc, 2)
    assert (await svc.apply(WorkerApplyRequest(model="m", apply_type="restart"),
                            ApplyOptions(apply_type="restart"))).output.success
    shutdown = proxies.call

    async def call(ep, method, *args, deadline):  # a shutdown takes the model off its registry
        out = await shutdown(ep, method, *args, deadline=deadline)
        if method == "shutdown":
            fleet[ep.port] = fleet[ep.port][1:]
            watchers.publish("a", *(i for p in fleet for i in fleet[p]))
        return out

    proxies.call = call
    await asyncio.wait_for(svc.deploy([Deployment(model="m", replicas=1)], wait=True, timeout=20), 15)
    run.cancel()


async def test_an_autoscaled_deployment_follows_the_load_the_callers_report():
    from coordinator.core.autoscale import Autoscale
    from coordinator.core.deployments import Deployment

    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2,
         "drain": {"grace": 0}, "caller": {"report_every": 1, "report_ttl": 3}})
    watchers, proxies = FakeWatchers(), FakeProxies()
    svc = CoordinatorService(config, watchers, proxies, registries=FakeRegistries())
    run = asyncio.create_task(svc.run())
    running = {1}
    managers = [inst("WorkerManager@service", p) for p in (1, 2, 3, 4)]

    def publish() -> None:
        watchers.publish("a", *managers, *(inst("m@llm", p) for p in sorted(running)))

    publish()
    await settle(svc, 1)
    answer = proxies.call

    async def call(ep, method, *args, deadline):  # the fleet does what it is told
        out = await answer(ep, method, *args, deadline=deadline)
        if method in ("startup", "shutdown"):
            (running.add if method == "startup" else running.discard)(ep.port)
            publish()
        return out

    proxies.call = call
    policy = Autoscale(min_replicas=1, max_replicas=3, target_in_flight=2, upscale_delay_s=0, downscale_delay_s=1)
    await svc.deploy([Deployment(model="m", replicas=1, autoscale=policy)], wait=True, timeout=10)

    svc.report_load("gw", 1, {("m@llm", "h", 1): 9}, applied=svc.view.routes.position)  # 9 in flight: 5 asked, 3 at most
    await svc.wait_for("m", 3, timeout=10)
    [status] = await svc.deployments()
    assert status.replicas == 3 and any(e.action == "autoscale" and "1 -> 3" in e.message for e in status.events)

    # The caller says no more (its report expires, as a gone caller's does):
    # the load is gone, and the count goes back to min_replicas, drained.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while len(running) != 1 and loop.time() < deadline:
        await asyncio.sleep(0.1)
    assert len(running) == 1
    [status] = await svc.deployments()
    assert status.replicas == 1
    run.cancel()


async def test_a_restarted_coordinators_drains_wait_to_hear_from_the_callers_first():
    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2,
         "drain": {"grace": 0}, "caller": {"report_every": 0.5, "report_ttl": 2}})
    loop = asyncio.get_running_loop()
    for restarted, at_least, at_most in ((False, 0.0, 1.0), (True, 1.5, 10.0)):
        watchers, proxies = FakeWatchers(), FakeProxies()
        svc = CoordinatorService(config, watchers, proxies, registries=FakeRegistries(), restarted=restarted)
        run = asyncio.create_task(svc.run())
        watchers.publish("a", inst("m@llm", 1))
        await settle(svc, 1)
        started = loop.time()
        [out] = (await svc.apply(WorkerApplyRequest(model="m", apply_type="stop"),
                                 ApplyOptions(apply_type="stop"))).outputs
        assert at_least <= loop.time() - started < at_most and "drained in" in out.message, restarted
        run.cancel()


async def at_zero(policy, *also, managers: int = 1):
    """A service with ``managers`` worker managers and model ``m`` deployed
    with ``policy`` (and the deployments ``also``), sampled at zero."""
    from coordinator.core.deployments import Deployment

    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2})
    watchers, proxies = FakeWatchers(), FakeProxies()
    svc = CoordinatorService(config, watchers, proxies, registries=FakeRegistries())
    run = asyncio.create_task(svc.run())
    watchers.publish("a", *(inst("WorkerManager@service", p) for p in range(1, managers + 1)))
    await svc.wait_for("WorkerManager", managers, "service", timeout=5)
    await svc.deploy([Deployment(model="m", replicas=0, autoscale=policy), *also])
    await eventually(lambda: svc.keeper.wanted_from_zero(["m@llm"]), "the deployment sampled at zero")
    return svc, proxies, run


async def test_a_request_held_for_a_model_at_zero_is_decided_on_at_once():
    """Not at the autoscaler's next once-a-second sample: the report that
    says a request waits for a model at zero sets its count to one itself."""
    from coordinator.core.autoscale import Autoscale

    svc, _, run = await at_zero(Autoscale(min_replicas=0, max_replicas=2, target_in_flight=1,
                                          downscale_to_zero_delay_s=60))
    svc.report_load("driver", 1, {}, applied=svc.view.routes.position, queued={"m@llm": 1})
    # Decided in the report's own call: no sample in between.
    assert svc.keeper.status("m@llm").replicas == 1
    [status] = await svc.deployments()
    assert any(e.action == "autoscale" and "0 -> 1" in e.message for e in status.events)
    run.cancel()


async def test_a_caller_asking_whether_to_hold_a_request_for_a_model_at_zero_starts_one():
    """The question itself says a request waits: no load report needed (a new
    process's first one can take most of a second)."""
    from coordinator.core.autoscale import Autoscale
    from coordinator.core.deployments import Deployment

    svc, _, run = await at_zero(Autoscale(min_replicas=0, max_replicas=2, target_in_flight=1,
                                          downscale_to_zero_delay_s=60, from_zero_timeout_s=30),
                                Deployment(model="n", replicas=0))
    assert svc.hold_for("n@llm") == 0 and svc.hold_for("x@llm") == 0  # not autoscaled, not deployed: no hold
    assert svc.hold_for("m@llm") == 30
    assert svc.keeper.status("m@llm").replicas == 1  # decided in the question's own call
    statuses = {s.key: s for s in await svc.deployments()}
    assert statuses["m@llm"].replicas == 1 and statuses["n@llm"].replicas == 0
    run.cancel()


async def test_a_burst_for_a_model_at_zero_gets_its_count_not_one_replica_and_a_delay():
    """The first request's question takes the count to one; the burst behind
    it, reported while that replica starts, takes it to what it asks without
    the upscale delay (60 s here: never within the test's 10 s)."""
    from coordinator.core.autoscale import Autoscale

    svc, proxies, run = await at_zero(Autoscale(min_replicas=0, max_replicas=8, target_in_flight=3,
                                                upscale_delay_s=60, downscale_to_zero_delay_s=300), managers=8)

    async def never_done(ep, method, *args, deadline):  # the starts never finish: nothing serves
        await asyncio.Event().wait()

    proxies.call = never_done
    assert svc.hold_for("m@llm") > 0
    assert svc.keeper.status("m@llm").replicas == 1
    svc.report_load("driver", 1, {}, applied=svc.view.routes.position, queued={"m@llm": 20})
    await eventually(lambda: svc.keeper.status("m@llm").replicas == 7, "20 waiting: 7 replicas", timeout=10)
    run.cancel()


async def test_a_shutdown_refused_and_followed_by_an_apply_stop_drains_the_instance_once():
    """DB-GPT 0.8.2 with its own controller answers a shutdown with a bare 500,
    the model still running; the keeper then stops it with an apply stop. The
    instance is drained once, before the shutdown, and stays out of the routes
    and listed unhealthy until the apply stop has stopped it — not put back
    between the two calls and drained again."""
    from coordinator.core.deployments import Deployment

    config = CoordinatorConfig.model_validate(
        {"registries": [{"kind": "static", "name": "a", "instances": []}], "long_poll_timeout": 0.2,
         "drain": {"grace": 0}})
    watchers, proxies, registries = FakeWatchers(), FakeProxies(), FakeRegistries()
    svc = CoordinatorService(config, watchers, proxies, registries=registries)
    run = asyncio.create_task(svc.run())
    fleet = {p: [inst("m@llm", p), inst("WorkerManager@service", p)] for p in (1, 2)}

    def publish() -> None:
        watchers.publish("a", *(i for p in sorted(fleet) for i in fleet[p]))

    publish()
    await settle(svc, 2)
    answer = proxies.call
    victim = ("m@llm", "h", 2)  # a scale-down to one stops the highest host:port
    seen_draining: list[bool] = []  # at each worker call, whether the victim was draining

    async def call(ep, method, *args, deadline):
        if ep.port == 2 and method in ("shutdown", "apply"):
            seen_draining.append(victim in svc.view.draining())
        if method == "shutdown":  # refused: the model still runs and stays registered
            proxies.calls.append((ep, method, args[0]))
            return WorkerApplyOutput(message=f"{ep}: shutdown failed: HTTP 500: Internal Server Error",
                                     success=False, host=ep.host, port=ep.port)
        out = await answer(ep, method, *args, deadline=deadline)
        if method == "apply":  # an apply stop stops it: listed unhealthy
            fleet[ep.port][0] = inst("m@llm", ep.port, healthy=False)
            publish()
        return out

    proxies.call = call
    await asyncio.wait_for(svc.deploy([Deployment(model="m", replicas=1)], wait=True, timeout=20), 15)
    assert [(ep.port, m) for ep, m, _ in proxies.calls if m in ("shutdown", "apply")] == [(2, "shutdown"), (2, "apply")]
    drains = sum(1 for before, now in zip([frozenset(), *registries.drained], registries.drained)
                 if victim in now and victim not in before)
    assert drains == 1, registries.drained
    assert seen_draining == [True, True]  # out of service through both calls
    [status] = await svc.deployments()
    [stop] = [e for e in status.events if e.action == "stop"]
    assert stop.ok and "HTTP 500" in stop.message and "apply stop: succeeded" in stop.message, stop
    assert victim not in svc.view.draining()
    run.cancel()
