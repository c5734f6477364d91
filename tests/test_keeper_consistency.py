"""The keeper's memory and its store agree, whatever fails or arrives when:
a save that fails changes nothing and sends nothing; a deploy during a round
neither orphans the round's bookkeeping nor makes it act twice; two
deployments placed in one breath do not stack on one manager; an instance
under a driver's operation or unreachable without proof of death is not
replaced. Fake fleet, in-memory store, no Ray."""

from __future__ import annotations

import asyncio

import pytest

from actors.registry_state import MemoryStateStore
from coordinator.core.config import ReconcileSettings
from coordinator.core.deployments import Deployment, Manager, Seen
from coordinator.control.keeper import Keeper
from coordinator.core.models import Endpoint, WorkerApplyOutput
from tests.test_keeper import FakeFleet

pytestmark = pytest.mark.anyio

A, B, C = Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 1), Endpoint("10.0.0.3", 1)


def keeper(fleet, store, **settings) -> Keeper:
    return Keeper(fleet, store, "deployments/t", ReconcileSettings(**settings), startup_timeout=60)


async def test_a_save_that_fails_sends_nothing_and_leaves_memory_as_kept():
    store, fleet = MemoryStateStore(), FakeFleet()
    k = keeper(fleet, store)
    await k.load()
    await k.deploy([Deployment(model="m", replicas=1)])
    kept = store.data["deployments/t"]
    store.fail = True
    with pytest.raises(OSError):
        await k._round("m@llm")
    assert fleet.sent == []  # the start was never on record, so never sent
    assert store.data["deployments/t"] == kept
    assert k.status("m@llm").observed_generation == 0  # memory did not move ahead of the store
    with pytest.raises(OSError):
        await k.deploy([Deployment(model="m", replicas=2)])
    assert k.spec("m@llm").replicas == 1  # a refused deploy changes nothing
    store.fail = False
    await k._round("m@llm")
    assert fleet.sent == [("start", A)]
    assert k.status("m@llm").state == "ready"


class RollingFleet(FakeFleet):
    """A fleet whose params roll takes a while (counted per instance)."""

    def __init__(self) -> None:
        super().__init__()
        self.rolled: list[Endpoint] = []
        self.rolling = asyncio.Event()
        self.release = asyncio.Event()

    async def roll(self, spec):
        self.rolling.set()
        await self.release.wait()
        self.rolled += sorted(self.running)
        return [self._ok(ep) for ep in sorted(self.running)]


async def test_a_deploy_during_a_params_roll_takes_effect_next_round_and_rolls_each_instance_once():
    store, fleet = MemoryStateStore(), RollingFleet()
    k = keeper(fleet, store)
    await k.load()
    await k.deploy([Deployment(model="m", replicas=2, params={"t": 1})])
    await k._round("m@llm")
    await k.deploy([Deployment(model="m", replicas=2, params={"t": 2})])
    rolling = asyncio.ensure_future(k._round("m@llm"))
    await asyncio.wait_for(fleet.rolling.wait(), 5)
    # Mid-roll, the operator redeploys: same params, one replica fewer.
    await k.deploy([Deployment(model="m", replicas=1, params={"t": 2})])
    fleet.release.set()
    await asyncio.wait_for(rolling, 5)
    await k._round("m@llm")  # the redeploy's round: scale down, no second roll
    await k._round("m@llm")
    assert sorted(fleet.rolled) == [A, B]  # each instance rolled exactly once
    assert [s for s in fleet.sent if s[0] == "stop"] and len(fleet.running) == 1
    assert k.status("m@llm").state == "ready"
    after = keeper(fleet, store)  # and the store agrees: a restart rolls nothing again
    await after.load()
    assert after.status("m@llm").state == "ready"


class SlowToRegister(FakeFleet):
    """Three empty managers; a started model shows up in the registry only later."""

    def __init__(self) -> None:
        super().__init__()
        self.registered: dict[str, set[Endpoint]] = {}

    def observe(self, key):
        models = {ep: sum(ep in eps for eps in self.registered.values()) for ep in (A, B, C)}
        return ([Seen(ep, True, True) for ep in sorted(self.registered.get(key, set()))],
                [Manager(ep, True, models[ep]) for ep in (A, B, C)])

    async def start(self, ep, spec):
        self.sent.append((f"start {spec.model}", ep))
        return self._ok(ep)


async def test_two_deployments_placed_at_once_go_to_different_managers():
    store, fleet = MemoryStateStore(), SlowToRegister()
    k = keeper(fleet, store)
    await k.load()
    await k.deploy([Deployment(model="one", replicas=1), Deployment(model="two", replicas=1)])
    await asyncio.gather(k._round("one@llm"), k._round("two@llm"))
    placed = [ep for _, ep in fleet.sent]
    assert len(placed) == 2 and len(set(placed)) == 2, fleet.sent  # fewest models, counting starts in flight


class Operated(FakeFleet):
    def __init__(self) -> None:
        super().__init__()
        self.under_operation: set[Endpoint] = set()
        self.seen: dict[Endpoint, Seen] = {}

    def observe(self, key):
        return sorted(self.seen.values()), [Manager(ep, True, int(ep in self.seen)) for ep in (A, B, C)]

    def operating(self, key):
        return frozenset(self.under_operation)


async def test_an_instance_a_driver_is_restarting_is_neither_replaced_nor_doubled():
    store, fleet = MemoryStateStore(), Operated()
    fleet.seen = {A: Seen(A, False, True)}  # restarting: listed, not healthy
    fleet.under_operation = {A}
    k = keeper(fleet, store)
    await k.load()
    await k.deploy([Deployment(model="m", replicas=1)])
    await k._round("m@llm")
    assert fleet.sent == []
    fleet.under_operation = set()  # the operation's grace is over and it is still not ready: replaced
    await k._round("m@llm")
    assert [kind for kind, _ in fleet.sent][:1] == ["start"]


async def test_an_unanswering_instance_is_replaced_only_after_replace_after_unless_refused():
    store, fleet = MemoryStateStore(), Operated()
    now = [1000.0]
    k = Keeper(fleet, store, "deployments/t", ReconcileSettings(replace_after=15), startup_timeout=60,
               clock=lambda: now[0])
    await k.load()
    await k.deploy([Deployment(model="m", replicas=1)])
    fleet.seen = {A: Seen(A, True, False, down_since=998.0)}  # a blip: timeouts for 2 s
    await k._round("m@llm")
    assert fleet.sent == [] and k.status("m@llm").state == "degraded"
    now[0] = 1013.5  # 15.5 s unreachable: a death after all
    await k._round("m@llm")
    assert [kind for kind, _ in fleet.sent] == ["start"]
    fleet.sent.clear()
    fleet.seen = {A: Seen(A, True, False, down_since=1013.0, refused=True)}  # refused: certain at once
    k2 = Keeper(Operated(), MemoryStateStore(), "deployments/t", ReconcileSettings(replace_after=15),
                startup_timeout=60, clock=lambda: 1014.0)
    k2._fleet.seen = fleet.seen
    await k2.load()
    await k2.deploy([Deployment(model="m", replicas=1)])
    await k2._round("m@llm")
    assert [kind for kind, _ in k2._fleet.sent] == ["start"]


class ParamsFleet(FakeFleet):
    """Two managers; each instance's params as its worker holds them. A start
    can be held in flight (``hold``)."""

    def __init__(self, running: dict[Endpoint, dict]) -> None:
        super().__init__()
        self.params = dict(running)
        self.running = set(running)
        self.hold: asyncio.Event | None = None
        self.starting = asyncio.Event()

    async def start(self, ep, spec):
        self.starting.set()
        if self.hold is not None:
            await self.hold.wait()
        self.params[ep] = dict(spec.params)
        return await super().start(ep, spec)

    async def stop(self, ep, spec):
        self.params.pop(ep, None)
        return await super().stop(ep, spec)

    async def roll(self, spec):
        self.params.update({ep: dict(spec.params) for ep in self.running})
        return await super().roll(spec)


@pytest.mark.parametrize("when", ["surge ready", "surge starting"])
async def test_params_deployed_back_mid_surge_leave_no_instance_running_the_newer_ones(when):
    """A surge roll from t=1 to t=2 starts the new instance (A) beside the old
    one (B); the operator deploys t=1 back before it is over — once A is
    ready, or while its start is in flight. Once settled, every instance runs
    t=1: the one started with t=2 does not stay as it is."""
    old, new = {"t": 1}, {"t": 2}
    store, fleet = MemoryStateStore(), ParamsFleet({B: old})  # B runs before it is deployed: adopted
    k = keeper(fleet, store)
    await k.load()
    await k.deploy([Deployment(model="m", replicas=1, max_surge=1, params=old)])
    await k._round("m@llm")
    assert fleet.sent == [] and k.status("m@llm").state == "ready"
    await k.deploy([Deployment(model="m", replicas=1, max_surge=1, params=new)])
    if when == "surge ready":
        await k._round("m@llm")
        assert fleet.params == {A: new, B: old}
    else:
        fleet.hold = asyncio.Event()
        surging = asyncio.ensure_future(k._round("m@llm"))
        await asyncio.wait_for(fleet.starting.wait(), 5)
    await k.deploy([Deployment(model="m", replicas=1, max_surge=1, params=old)])  # back, mid-roll
    if when == "surge starting":
        fleet.hold.set()
        await asyncio.wait_for(surging, 5)
    for _ in range(6):
        await k._round("m@llm")
    assert list(fleet.params.values()) == [old], fleet.params
    assert k.status("m@llm").state == "ready"
    after = keeper(fleet, store)  # and the store agrees: a restart does nothing more
    await after.load()
    await after._round("m@llm")
    assert list(fleet.params.values()) == [old] and after.status("m@llm").state == "ready"


async def test_params_deployed_back_after_a_roll_that_updated_some_instances_roll_those_back():
    """An in-place roll to t=2 updates A, then fails on B; the operator deploys
    t=1 back. A runs t=2: it is rolled back too, not left as it is."""
    old, new = {"t": 1}, {"t": 2}
    store, fleet = MemoryStateStore(), ParamsFleet({A: old, B: old})
    k = keeper(fleet, store)
    await k.load()
    await k.deploy([Deployment(model="m", replicas=2, params=old)])
    roll = fleet.roll

    async def fails_on_b(spec):
        fleet.params[A] = dict(spec.params)
        fleet.roll = roll  # once
        return [fleet._ok(A), WorkerApplyOutput(message="HTTP 500", success=False, host=B.host, port=B.port)]

    fleet.roll = fails_on_b
    await k.deploy([Deployment(model="m", replicas=2, params=new)])
    await k._round("m@llm")
    assert fleet.params == {A: new, B: old} and k.status("m@llm").state == "failing"
    await k.deploy([Deployment(model="m", replicas=2, params=old)])
    for _ in range(3):
        await k._round("m@llm")
    assert fleet.params == {A: old, B: old}
    assert k.status("m@llm").state == "ready"
