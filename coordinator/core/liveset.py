"""Pure decisions about the live instance set. Imports neither ray nor httpx.

- :func:`screen_listing` — a registry's listing, bad entries dropped and named;
- :class:`LiveSet` — every watcher's changes merged into one live set, at a
  cost proportional to what changed (:func:`merge_sources` is its specification);
- :func:`apply_targets`, :func:`manager_endpoints` — which endpoints an
  operation goes to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Iterable, Mapping, Sequence
from datetime import datetime
from typing import NamedTuple

from pydantic import ValidationError

from coordinator.core.changes import Change, ChangeLog, Delta, Snapshot, identity
from coordinator.core.hosts import show
from coordinator.core.models import WORKER_MANAGER_KEY, Endpoint, ModelInstance, worker_key

__all__ = ["Snapshot", "Delta"]  # re-exported: the change types live in coordinator.core.changes

Identity = tuple[str, str, int]


class Screened(NamedTuple):
    """A registry's listing after screening: the valid entries, and why each
    other one was refused."""

    instances: list[ModelInstance]
    rejected: list[str]


def screen_entry(entry: object) -> ModelInstance | str:
    """One entry as an instance, or why it is refused."""
    try:
        return ModelInstance.model_validate(entry)
    except ValidationError as exc:
        return _describe_rejected(entry, exc)


def screen_entries(raw: object) -> Screened:
    """Validate a list of entries one by one: a bad entry (a host that is not
    a bare hostname or IP, a port out of range, ...) is dropped and described,
    and never spoils the rest. ``ValueError`` when ``raw`` is not a list."""
    if not isinstance(raw, list):
        raise ValueError(f"expected a list of instances, got {type(raw).__name__}")
    instances, rejected = [], []
    for entry in raw:
        screened = screen_entry(entry)
        (rejected if isinstance(screened, str) else instances).append(screened)
    return Screened(instances, rejected)


def require_some(listing: Screened) -> Screened:
    """A registry's listing with entries of which not one is valid is a registry
    answering garbage (``ValueError``): its last good listing should stand, not
    an empty one."""
    if listing.rejected and not listing.instances:
        raise ValueError(
            f"none of the {len(listing.rejected)} entries is a valid instance; first: {listing.rejected[0]}"
        )
    return listing


def screen_listing(raw: object) -> Screened:
    """A registry's answer, screened as :func:`screen_entries` does, and held to
    :func:`require_some`."""
    return require_some(screen_entries(raw))


def _describe_rejected(entry: object, exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "entry"
    if isinstance(entry, dict):
        what = f"{show(entry.get('model_name'), 40)} at {show(entry.get('host'), 40)}:{show(entry.get('port'), 12)}"
    else:
        what = show(entry, 40)
    return f"{what}: {where}: {err['msg']}"


def _preference(inst: ModelInstance) -> tuple[bool, datetime]:
    return (bool(inst.healthy), inst.last_heartbeat or datetime.min)


def merge_sources(snapshots: Mapping[str, Sequence[ModelInstance]]) -> list[ModelInstance]:
    """Union of every source's instances, one entry per (key, host, port).

    When two sources list the same entry, the healthy one wins, then the one with
    the newer heartbeat, then the source first in name order. The result is
    sorted, so equal inputs give equal outputs. (The whole-state statement of
    what :class:`LiveSet` keeps incrementally; its tests compare the two.)
    """
    best: dict[tuple[str, str, int], ModelInstance] = {}
    for source in sorted(snapshots):
        for inst in snapshots[source]:
            held = best.get(inst.identity)
            if held is None or _preference(inst) > _preference(held):
                best[inst.identity] = inst
    return [best[k] for k in sorted(best)]


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


def as_listed(inst: ModelInstance, down: Container[tuple[str, int]],
              draining: Container[tuple[str, str, int]]) -> ModelInstance:
    """``inst`` as the embedded registry lists it to DB-GPT's servers: unhealthy
    while its endpoint is found unreachable (``down``) or it is being drained,
    whatever its own state says."""
    if inst.healthy and (inst.endpoint in down or inst.identity in draining):
        return inst.model_copy(update={"healthy": False})
    return inst


def filter_instances(
    instances: Iterable[ModelInstance],
    model: str | None = None,
    worker_type: str | None = None,
    healthy_only: bool = True,
) -> list[ModelInstance]:
    """The instances a caller asked for (healthy as listed: see :func:`as_listed`)."""
    out = []
    for inst in instances:
        name, _, wtype = inst.model_name.rpartition("@")
        if model is not None and name != model:
            continue
        if worker_type is not None and wtype != worker_type:
            continue
        if healthy_only and not inst.healthy:
            continue
        out.append(inst)
    return out


class Absorbed(NamedTuple):
    endpoints: set[Endpoint]  # that may have appeared in, or left, the live set
    keys: set[str]  # worker keys whose instances changed
    identities: set[Identity] = set()  # entries that changed (or left)


class LiveSet:
    """Every source's instances merged into one live set, kept current change by
    change: absorbing a delta costs what it carries (times the number of
    sources), whatever the size of the fleet. The merged set is itself a
    :class:`ChangeLog`, so it can be followed the same way."""

    def __init__(self, sources: Iterable[str]) -> None:
        self._order = sorted(sources)
        self._by_source: dict[str, dict[Identity, ModelInstance]] = {s: {} for s in self._order}
        self._source_endpoints: dict[str, Counter[Endpoint]] = {s: Counter() for s in self._order}
        self.merged: ChangeLog[Identity, ModelInstance] = ChangeLog(identity)
        self._by_key: dict[str, dict[Identity, ModelInstance]] = {}
        self._endpoint_refs: Counter[Endpoint] = Counter()
        self._at_endpoint: dict[Endpoint, set[Identity]] = {}

    # ---- reads ----------------------------------------------------------

    def instances(self) -> list[ModelInstance]:
        """Every live instance, sorted."""
        return [v for _, v in sorted(self.merged.items())]

    def of_key(self, key: str) -> list[ModelInstance]:
        """The instances of one worker key (``model@type``)."""
        return list(self._by_key.get(key, {}).values())

    def endpoints(self) -> frozenset[Endpoint]:
        return frozenset(self._endpoint_refs)

    def has_endpoint(self, endpoint: Endpoint) -> bool:
        return endpoint in self._endpoint_refs

    def keys_at(self, endpoint: Endpoint) -> set[str]:
        """The worker keys with an instance at ``endpoint``."""
        return {ident[0] for ident in self._at_endpoint.get(endpoint, ())}

    def at(self, endpoint: Endpoint) -> list[ModelInstance]:
        """The instances at ``endpoint`` (every key it serves)."""
        found = (self.merged.get(ident) for ident in self._at_endpoint.get(endpoint, ()))
        return [i for i in found if i is not None]

    def listed_by(self, endpoint: Endpoint) -> list[str]:
        """The sources that list anything at ``endpoint`` (sorted)."""
        return [s for s in self._order if self._source_endpoints[s][endpoint] > 0]

    def __len__(self) -> int:
        return len(self.merged)

    # ---- changes --------------------------------------------------------

    def absorb(self, source: str, change: Change) -> Absorbed:
        """Apply one source's change; say which endpoints it touched (those
        that may have appeared in, or left, the live set) and which worker
        keys' instances changed."""
        held = self._by_source[source]
        if isinstance(change, Delta):
            pairs: list[tuple[Identity, ModelInstance | None]] = [(v.identity, v) for v in change.upserts]
            pairs += [(tuple(k), None) for k in change.removed]
        else:
            fresh = {v.identity: v for v in change.instances}
            pairs = [(k, v) for k, v in fresh.items() if held.get(k) != v]
            pairs += [(k, None) for k in held if k not in fresh]
        touched: set[Endpoint] = set()
        keys: set[str] = set()
        identities: set[Identity] = set()
        counts = self._source_endpoints[source]
        for ident, value in pairs:
            ep = Endpoint(ident[1], ident[2])
            if value is None:
                if held.pop(ident, None) is not None:
                    counts[ep] -= 1
                    if not counts[ep]:
                        del counts[ep]
            else:
                if ident not in held:
                    counts[ep] += 1
                held[ident] = value
            self._remerge(ident, ep, touched)
            keys.add(ident[0])
            identities.add(ident)
        return Absorbed(touched, keys, identities)

    def _remerge(self, ident: Identity, ep: Endpoint, touched: set[Endpoint]) -> None:
        best: ModelInstance | None = None
        for source in self._order:
            inst = self._by_source[source].get(ident)
            if inst is not None and (best is None or _preference(inst) > _preference(best)):
                best = inst
        present = ident in self.merged
        if best is None:
            if present:
                self.merged.remove(ident)
                del self._by_key[ident[0]][ident]
                if not self._by_key[ident[0]]:
                    del self._by_key[ident[0]]
                self._endpoint_refs[ep] -= 1
                self._at_endpoint[ep].discard(ident)
                if not self._endpoint_refs[ep]:
                    del self._endpoint_refs[ep], self._at_endpoint[ep]
                    touched.add(ep)
            return
        self.merged.put(best)
        self._by_key.setdefault(ident[0], {})[ident] = best
        if not present:
            self._endpoint_refs[ep] += 1
            self._at_endpoint.setdefault(ep, set()).add(ident)
            if self._endpoint_refs[ep] == 1:
                touched.add(ep)
