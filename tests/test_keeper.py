"""The deployment keeper with a fake fleet and an in-memory store: what it keeps
across restarts, and what it sends. No Ray."""

from __future__ import annotations

import asyncio

import pytest

from actors.registry_state import MemoryStateStore
from coordinator.core.config import ReconcileSettings
from coordinator.core.deployments import Deployment, Manager, Seen
from coordinator.core.errors import NotDeployedError
from coordinator.control.keeper import Keeper
from coordinator.core.models import ApplyType, Endpoint, WorkerApplyOutput

A, B = Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 1)


class FakeFleet:
    def __init__(self) -> None:
        self.running: set[Endpoint] = set()
        self.sent: list[tuple[str, Endpoint]] = []

    def observe(self, key):
        return ([Seen(ep, True, True) for ep in sorted(self.running)],
                [Manager(ep, True, int(ep in self.running)) for ep in (A, B)])

    def operating(self, key):
        return frozenset()

    async def rebuilt(self):
        pass

    async def in_turn(self, key, start, same):
        return await start()

    def changed(self):
        pass

    def _ok(self, ep):
        return WorkerApplyOutput(message="ok", success=True, timecost=0, host=ep.host, port=ep.port)

    async def start(self, ep, spec):
        self.sent.append(("start", ep))
        self.running.add(ep)
        return self._ok(ep)

    async def stop(self, ep, spec):
        self.sent.append(("stop", ep))
        self.running.discard(ep)
        return self._ok(ep), None

    async def apply_one(self, ep, spec, apply_type: ApplyType):
        self.sent.append((f"apply {apply_type.value}", ep))
        return self._ok(ep)

    async def roll(self, spec):
        self.sent.append(("update_params", None))
        return [self._ok(ep) for ep in sorted(self.running)]


def keeper(fleet, store) -> Keeper:
    return Keeper(fleet, store, "deployments/t", ReconcileSettings(), startup_timeout=60)


@pytest.mark.anyio
async def test_configured_deployments_are_kept_unless_already_kept():
    store, fleet = MemoryStateStore(), FakeFleet()
    first = keeper(fleet, store)
    await first.load([Deployment(model="m", replicas=2)])
    assert [(s.key, s.replicas, s.generation) for s in first.statuses()] == [("m@llm", 2, 1)]
    assert await first.deploy([Deployment(model="m", replicas=1)]) == [2]
    # A restart with the same config: the kept deployment (1 replica, generation 2) wins.
    again = keeper(fleet, store)
    await again.load([Deployment(model="m", replicas=2), Deployment(model="n", replicas=1)])
    assert [(s.key, s.replicas, s.generation) for s in again.statuses()] == [("m@llm", 1, 2), ("n@llm", 1, 1)]


@pytest.mark.anyio
async def test_a_round_starts_what_is_missing_and_a_restart_remembers_starts_in_flight():
    store, fleet = MemoryStateStore(), FakeFleet()
    k = keeper(fleet, store)
    await k.load()
    await k.deploy([Deployment(model="m", replicas=2)])
    in_flight: list[Endpoint] = []

    async def never_answers(ep, spec):
        in_flight.append(ep)
        await asyncio.Event().wait()

    fleet.start = never_answers  # the starts are in flight when the coordinator dies
    task = asyncio.ensure_future(k._round("m@llm"))
    await _until(lambda: sorted(in_flight) == [A, B], "both starts sent")
    # The coordinator dies now: what the store holds at this moment is all a
    # restart finds (a cancelled round's clean-up would save more than a death).
    at_death = MemoryStateStore()
    at_death.data = dict(store.data)
    task.cancel()
    restarted, fresh = keeper(fleet, at_death), FakeFleet()
    restarted._fleet = fresh
    await restarted.load()
    await restarted._round("m@llm")
    assert fresh.sent == []  # both starts are on record: none is sent twice
    assert restarted.status("m@llm").state == "progressing"


async def _until(condition, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not true within {timeout} s: {what}"
        await asyncio.sleep(0.01)


@pytest.mark.anyio
async def test_new_params_roll_once_and_undeploy_forgets():
    store, fleet = MemoryStateStore(), FakeFleet()
    k = keeper(fleet, store)
    await k.load()
    await k.deploy([Deployment(model="m", replicas=2, params={"t": 1})])
    await k._round("m@llm")
    assert sorted(fleet.sent) == [("start", A), ("start", B)]
    await k.deploy([Deployment(model="m", replicas=2, params={"t": 2})])
    await k._round("m@llm")
    await k._round("m@llm")
    assert fleet.sent[2:] == [("update_params", None)]
    assert k.status("m@llm").state == "ready"
    last = await k.undeploy("m@llm", shutdown=True)
    assert last.replicas == 0 and fleet.running == set()
    with pytest.raises(NotDeployedError, match="m@llm"):
        await k.undeploy("m@llm")
    after = keeper(fleet, store)
    await after.load()
    assert after.statuses() == []  # forgotten in the store too


@pytest.mark.anyio
async def test_a_record_kept_by_an_older_coordinator_mid_surge_keeps_its_fresh_instances():
    """Records once listed the instances a surge started as ``fresh`` (started
    with the spec's params); loaded now, they are the same instances."""
    from coordinator.control.keeper import Record

    spec = Deployment(model="m", replicas=1, max_surge=1, params={"t": 2})
    old = {"spec": spec.model_dump(mode="json"), "generation": 2, "applied": "0123456789abcdef",
           "fresh": ["10.0.0.2:1"]}
    assert Record.model_validate(old).started == {"10.0.0.2:1": spec.params_digest}
    assert Record.model_validate({**old, "fresh": []}).started == {}


@pytest.mark.anyio
@pytest.mark.parametrize("startup_s, wanted", [(None, 10), (0.0, 7)])
async def test_the_autoscaler_looks_as_far_ahead_as_the_deployments_starts_took(startup_s, wanted):
    """A policy without ``startup_s`` takes the cold start the keeper timed
    (30 s here): a load rising 0.5/s is met with what it will ask 35 s on."""
    from coordinator.core.autoscale import Autoscale

    now = [0.0]
    managers = [Endpoint("10.0.1.1", p) for p in range(1, 13)]

    class Fleet(FakeFleet):
        def observe(self, key):
            return ([Seen(ep, True, True) for ep in sorted(self.running)],
                    [Manager(ep, True, int(ep in self.running)) for ep in managers])

        async def start(self, ep, spec):
            now[0] += 30  # a 30 s cold start
            return await super().start(ep, spec)

    k = Keeper(Fleet(), MemoryStateStore(), "deployments/t", ReconcileSettings(), startup_timeout=60,
               clock=lambda: now[0])
    await k.load()
    policy = Autoscale(min_replicas=1, max_replicas=10, target_in_flight=1, upscale_delay_s=5,
                       downscale_delay_s=60, startup_s=startup_s)
    await k.deploy([Deployment(model="m", replicas=1, autoscale=policy)])
    await k._round("m@llm")  # the first replica: its start is timed
    for t in range(7):  # 1, 1.5 ... 4 in flight: more asked from the second sample, for 5 s
        now[0] += 1
        k.autoscale({"m@llm": 1 + 0.5 * t})
    # 4 in flight rising 0.5/s: 4 + 0.5 x (5 + 30) = 21.5 (at most 10); with no cold start, 4 + 2.5 -> 7.
    assert k.status("m@llm").replicas == wanted
