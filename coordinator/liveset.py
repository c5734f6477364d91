"""Pure decisions about the live instance set. Imports neither ray nor httpx.

- :func:`screen_listing` — a registry's listing, bad entries dropped and named;
- :func:`merge_sources` — one instance list out of every watcher's snapshot;
- :func:`diff_endpoints` — which proxies to create and which to retire;
- :func:`apply_targets`, :func:`manager_endpoints`, :func:`endpoint_is_listed` —
  which endpoints an operation goes to.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import NamedTuple

from pydantic import ValidationError

from coordinator.hosts import show
from coordinator.models import WORKER_MANAGER_KEY, Endpoint, ModelInstance, worker_key


class Snapshot(NamedTuple):
    """A watcher's view at one moment. ``epoch`` changes when the watcher restarts,
    so a consumer holding an old version asks again from scratch."""

    epoch: str
    version: int
    instances: tuple[ModelInstance, ...]


class Screened(NamedTuple):
    """A registry's listing after screening: the valid entries, and why each
    other one was refused."""

    instances: list[ModelInstance]
    rejected: list[str]


def screen_entries(raw: object) -> Screened:
    """Validate a list of entries one by one: a bad entry (a host that is not
    a bare hostname or IP, a port out of range, ...) is dropped and described,
    and never spoils the rest. ``ValueError`` when ``raw`` is not a list."""
    if not isinstance(raw, list):
        raise ValueError(f"expected a list of instances, got {type(raw).__name__}")
    instances, rejected = [], []
    for entry in raw:
        try:
            instances.append(ModelInstance.model_validate(entry))
        except ValidationError as exc:
            rejected.append(_describe_rejected(entry, exc))
    return Screened(instances, rejected)


def screen_listing(raw: object) -> Screened:
    """A registry's answer, screened as :func:`screen_entries` does. A listing
    with entries of which not one is valid is a registry answering garbage
    (``ValueError``): its last good listing should stand, not an empty one."""
    listing = screen_entries(raw)
    if listing.rejected and not listing.instances:
        raise ValueError(
            f"none of the {len(listing.rejected)} entries is a valid instance; first: {listing.rejected[0]}"
        )
    return listing


def _describe_rejected(entry: object, exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "entry"
    if isinstance(entry, dict):
        what = f"{show(entry.get('model_name'), 40)} at {show(entry.get('host'), 40)}:{show(entry.get('port'), 12)}"
    else:
        what = show(entry, 40)
    return f"{what}: {where}: {err['msg']}"


class EndpointDiff(NamedTuple):
    added: frozenset[Endpoint]
    removed: frozenset[Endpoint]


def _preference(inst: ModelInstance) -> tuple[bool, datetime]:
    return (bool(inst.healthy), inst.last_heartbeat or datetime.min)


def merge_sources(snapshots: Mapping[str, Sequence[ModelInstance]]) -> list[ModelInstance]:
    """Union of every source's instances, one entry per (key, host, port).

    When two sources list the same entry, the healthy one wins, then the one with
    the newer heartbeat. The result is sorted, so equal inputs give equal outputs.
    """
    best: dict[tuple[str, str, int], ModelInstance] = {}
    for source in sorted(snapshots):
        for inst in snapshots[source]:
            held = best.get(inst.identity)
            if held is None or _preference(inst) > _preference(held):
                best[inst.identity] = inst
    return [best[k] for k in sorted(best)]


def listing_sources(snapshots: Mapping[str, Sequence[ModelInstance]]) -> dict[Endpoint, list[str]]:
    """For every endpoint, the sources that list it (sorted)."""
    out: dict[Endpoint, set[str]] = {}
    for source, instances in snapshots.items():
        for inst in instances:
            out.setdefault(inst.endpoint, set()).add(source)
    return {ep: sorted(names) for ep, names in out.items()}


def endpoints_of(instances: Iterable[ModelInstance]) -> frozenset[Endpoint]:
    return frozenset(i.endpoint for i in instances)


def diff_endpoints(current: Iterable[Endpoint], desired: Iterable[Endpoint]) -> EndpointDiff:
    current, desired = frozenset(current), frozenset(desired)
    return EndpointDiff(added=desired - current, removed=current - desired)


def apply_targets(
    instances: Iterable[ModelInstance], model: str, worker_type: str
) -> list[Endpoint]:
    """Every registered instance of ``model@worker_type``, healthy or not: a stopped
    model is registered unhealthy and must still be startable. One entry per
    endpoint, sorted."""
    key = worker_key(model, worker_type)
    return sorted({i.endpoint for i in instances if i.model_name == key})


def manager_endpoints(
    instances: Iterable[ModelInstance], healthy_only: bool = True
) -> list[Endpoint]:
    """Endpoints of the worker-manager processes (``WorkerManager@service``)."""
    return sorted(
        {
            i.endpoint
            for i in instances
            if i.model_name == WORKER_MANAGER_KEY and (i.healthy or not healthy_only)
        }
    )


def endpoint_is_listed(instances: Iterable[ModelInstance], endpoint: Endpoint) -> bool:
    """Whether any registry lists anything at ``endpoint`` — the condition for
    sending startup/shutdown there."""
    return any(i.endpoint == endpoint for i in instances)


def filter_instances(
    instances: Iterable[ModelInstance],
    model: str | None = None,
    worker_type: str | None = None,
    healthy_only: bool = True,
    unreachable: frozenset[Endpoint] = frozenset(),
) -> list[ModelInstance]:
    """The instances a caller asked for. An instance counts as healthy when its
    registry says so *and* its proxy has not found the endpoint unreachable."""
    out = []
    for inst in instances:
        name, _, wtype = inst.model_name.rpartition("@")
        if model is not None and name != model:
            continue
        if worker_type is not None and wtype != worker_type:
            continue
        if healthy_only and not (inst.healthy and inst.endpoint not in unreachable):
            continue
        out.append(inst)
    return out
