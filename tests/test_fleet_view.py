"""The fleet's view on its own (no Ray, no HTTP): what the keeper is shown of
an instance's outages — one outage, one start time, however it flaps; a new
outage, a new start; a refused connection passed on as a certain death."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from coordinator.control.fleet_view import FleetView
from coordinator.core.config import CoordinatorConfig
from coordinator.core.liveset import Snapshot
from coordinator.core.models import Endpoint, ModelInstance

pytestmark = pytest.mark.anyio

EP = Endpoint("h", 1)


class Proxies:
    def __init__(self) -> None:
        self.live: set[Endpoint] = set()

    def endpoints(self):
        return set(self.live)

    def ensure(self, ep, access):
        self.live.add(ep)

    def retire(self, ep):
        self.live.discard(ep)


def probe(reachable: bool, refused: bool = False):
    return SimpleNamespace(reachable=reachable, last_error=None if reachable else "x", refused=refused,
                           consecutive_failures=0 if reachable else 2)


@pytest.fixture
def view():
    now = [1000.0]
    config = CoordinatorConfig.model_validate({"registries": [{"kind": "static", "name": "a", "instances": []}],
                                               "reconcile": {"replace_after": 15}})
    v = FleetView(config, Proxies(), clock=lambda: now[0])
    v.absorb("a", Snapshot("e", 1, (ModelInstance(model_name="m@llm", host="h", port=1, healthy=True),)))
    return v, now


def seen(v: FleetView):
    [s] = v.observe("m@llm")[0]
    return s


async def test_a_flapping_instance_keeps_its_outage_start_and_a_new_outage_gets_a_new_one(view):
    v, now = view
    v.report_probe(EP, probe(False))
    assert seen(v).down_since == 1000.0 and seen(v).held(now[0], 15)
    now[0] = 1003
    v.report_probe(EP, probe(True))  # answers again; the registry may still list it unhealthy
    assert seen(v).down_since == 1000.0
    now[0] = 1005
    v.report_probe(EP, probe(False))  # down again at once: the same outage
    assert seen(v).down_since == 1000.0
    now[0] = 1006
    v.report_probe(EP, probe(True))
    now[0] = 1012  # answering for 6 s: an unhealthy listing now is the registry's own word, not an echo
    assert seen(v).down_since is None
    now[0] = 4600  # an hour of quiet, then a new blip: a new outage, waited for afresh
    v.report_probe(EP, probe(False))
    assert seen(v).down_since == 4600 and seen(v).held(now[0], 15)


async def test_a_refused_connection_is_shown_as_a_certain_death(view):
    v, now = view
    v.report_probe(EP, probe(False, refused=True))
    assert seen(v).refused and not seen(v).held(now[0], 15)


async def test_the_in_flight_gauge_follows_the_reports_and_reads_zero_once_they_expire():
    now = [1000.0]
    recorded: list[dict[str, int]] = []
    metrics = SimpleNamespace(in_flight=recorded.append, live_instances=lambda *a: None, draining=lambda *a: None,
                              waiting=lambda *a: None)
    config = CoordinatorConfig.model_validate({"registries": [{"kind": "static", "name": "a", "instances": []}],
                                               "caller": {"report_every": 1, "report_ttl": 3}})
    v = FleetView(config, Proxies(), metrics=metrics, clock=lambda: now[0])
    others = v.report_load("gw-1", 1, {("m@llm", "h", 1): 2})
    assert others == {}
    assert v.report_load("gw-2", 1, {("m@llm", "h", 1): 1}) == {("m@llm", "h", 1): 2}
    assert v.in_flight(("m@llm", "h", 1)) == 3
    v.record_gauges(everything=False)
    v.record_gauges(everything=False)  # unchanged: not re-recorded until the refresh
    assert recorded == [{"m@llm": 3}]
    now[0] += 3  # both silent for the ttl: their processes died
    v.record_gauges(everything=False)
    v.record_gauges(everything=True)
    assert recorded[1:] == [{"m@llm": 0}]  # once, then left to age out
    assert v.load.reporters(now[0]) == 0


async def test_a_stopped_instance_stays_out_of_the_routes_until_its_registry_catches_up_or_it_starts_again(view):
    v, now = view
    ident = ("m@llm", "h", 1)
    assert [r.port for r in v.routes.values()] == [1]
    v.drain([ident])
    assert list(v.routes.values()) == []
    v.undrain([ident], stopped=[ident])  # the stop answered; the registry still lists it healthy
    assert list(v.routes.values()) == []
    v.started([ident])  # started again by a later operation: routable as listed
    assert [r.port for r in v.routes.values()] == [1]
    v.drain([ident])
    v.undrain([ident], stopped=[ident])
    now[0] += 31  # the registry never caught up (it did not stop, after all): back after the hold
    v.record_gauges(everything=False)
    assert [r.port for r in v.routes.values()] == [1]
    v.drain([ident])
    v.undrain([ident], stopped=[ident])
    v.absorb("a", Snapshot("e", 2, (ModelInstance(model_name="m@llm", host="h", port=1, healthy=False),)))
    v.absorb("a", Snapshot("e", 3, (ModelInstance(model_name="m@llm", host="h", port=1, healthy=True),)))
    assert [r.port for r in v.routes.values()] == [1]  # it showed the stop, then came back on its own


class Registries:
    """What the embedded registries are told."""

    present = True

    def __init__(self) -> None:
        self.told: list[tuple[frozenset, frozenset]] = []

    def tell(self, unreachable, draining=frozenset()):
        self.told.append((unreachable, draining))

    async def quiet_for(self, instances):
        return None


async def test_the_coordinators_listing_shows_drained_and_unreachable_instances_unhealthy_as_dbgpts_does():
    """The embedded registry's feed carries each entry's own state; the
    coordinator's own listing (cluster.instances(), RayWorkerManager) says
    what the registry's HTTP listing says to DB-GPT's servers."""
    config = CoordinatorConfig.model_validate({"registries": [{"kind": "static", "name": "a", "instances": []}]})
    v = FleetView(config, Proxies(), registries=Registries())
    v.absorb("a", Snapshot("e", 1, tuple(ModelInstance(model_name="m@llm", host="h", port=p, healthy=True)
                                         for p in (1, 2, 3))))
    v.drain([("m@llm", "h", 2)])
    v.report_probe(Endpoint("h", 3), probe(False))
    assert [i.port for i in v.select("m", "llm", healthy_only=True)] == [1]
    assert [(i.port, i.healthy) for i in v.select("m", "llm", healthy_only=False)] == [(1, True), (2, False), (3, False)]
    v.undrain([("m@llm", "h", 2)])
    assert [i.port for i in v.select("m", "llm", healthy_only=True)] == [1, 2]


async def test_a_registry_that_starts_over_is_told_at_once_what_is_drained():
    """Its word is not saved: a restarted registry (a new snapshot) hears it
    again at once, not at the next resync."""
    registries = Registries()
    config = CoordinatorConfig.model_validate({"registries": [{"kind": "static", "name": "a", "instances": []}]})
    v = FleetView(config, Proxies(), registries=registries)
    instance = ModelInstance(model_name="m@llm", host="h", port=1, healthy=True)
    v.absorb("a", Snapshot("e", 1, (instance,)))
    assert registries.told == [(frozenset(), frozenset())]  # the first word goes out, empty or not
    v.drain([("m@llm", "h", 1)])
    assert registries.told[-1][1] == {("m@llm", "h", 1)}
    told = len(registries.told)
    v.absorb("a", Snapshot("restarted", 1, (instance,)))
    assert len(registries.told) == told + 1 and registries.told[-1][1] == {("m@llm", "h", 1)}
