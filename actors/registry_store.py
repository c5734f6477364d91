"""The embedded registry's state, as plain Python: no ray, no HTTP, a clock you pass.

It follows DB-GPT's model controller: registering an existing (key, host, port)
updates it and marks it healthy; a heartbeat from an unknown instance registers
it; deregistering marks an entry unhealthy and removes it only when asked; an
entry with ``check_healthy`` whose last heartbeat is older than the timeout is
marked unhealthy but stays listed.

Every write costs what it changes, whatever the registry's size: entries are
keyed by ``(model_name, host, port)``; the entries that can expire wait in a
queue ordered by their last heartbeat, so an expiry pass looks only at the
ones that are due; and every visible change is recorded in :attr:`changes`
(a :class:`~coordinator.core.changes.ChangeLog`), from which the
coordinator's watcher and the journal take deltas. Heartbeats that only move ``last_heartbeat`` record
nothing, so a quiet fleet produces no changes — and allocate nothing that
outlives the request: heartbeat times are kept as floats beside the entries,
which change only when something visible does (a steady turnover of long-lived
objects is what makes Python's full garbage collections long and frequent).
The listing puts the heartbeat times back in.

Beyond DB-GPT: the coordinator tells the store which endpoints its probes find
unreachable (:meth:`set_unreachable`). Every entry at such an endpoint is
*listed* unhealthy in the HTTP listing DB-GPT's servers read, whatever its
heartbeats say, until the probes find it answering again. The same holds for
the instances the coordinator is *draining* before it stops, restarts or
reconfigures them (``draining`` of :meth:`set_unreachable`): listed
unhealthy, so DB-GPT's servers stop choosing them. The change log holds the
entries' own state (what heartbeats and registrations set), not that word:
the coordinator knows what it said, and reading it back from its watcher
would only echo it, late — a rolling restart's health gate passed on a
listing from before its drain, then the drain's echo took the replica out of
the deployment's ready count. So does the journal: the word is not saved (a
restarted registry hears it again).

And the store remembers when it last handed each entry out as healthy in a
listing (:meth:`quiet_for`): a drain waits until readers that report nothing
(DB-GPT's API server, its webserver) have had time to finish what they sent
to an instance they were last shown.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime

from coordinator.core.changes import ChangeLog, identity
from coordinator.core.liveset import as_listed, screen_entries
from coordinator.core.models import ModelInstance

Identity = tuple[str, str, int]


class RegistryFull(Exception):
    """A new entry would take the registry past its limit."""


class RegistryStore:
    def __init__(
        self,
        heartbeat_timeout: float,
        clock: Callable[[], float] = time.time,
        max_entries: int | None = None,
        epoch: str | None = None,
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.max_entries = max_entries
        self._clock = clock
        # Each entry as of its last visible change (the change log holds the same objects).
        self._entries: dict[Identity, ModelInstance] = {}
        self._beats: dict[Identity, float] = {}  # last heartbeat, wall-clock seconds
        # Entries that can expire (healthy, check_healthy), oldest heartbeat first.
        self._due: OrderedDict[Identity, float] = OrderedDict()
        #: Every visible change; watchers and the journal read deltas from it.
        self.changes: ChangeLog[Identity, ModelInstance] = ChangeLog(identity, epoch)
        #: Endpoints the coordinator's probes find unreachable, and the entries at each endpoint.
        self._down: frozenset[tuple[str, int]] = frozenset()
        self._at: dict[tuple[str, int], set[Identity]] = {}
        #: Instances the coordinator is draining: listed unhealthy as well.
        self._draining: frozenset[Identity] = frozenset()
        #: When each entry was last listed healthy to a reader (store clock).
        self._handed_out: dict[Identity, float] = {}

    @property
    def version(self) -> int:
        return self.changes.version

    # ---- writes ---------------------------------------------------------

    def register(self, inst: ModelInstance) -> bool:
        """Add or refresh an entry and mark it healthy. Returns whether the
        visible state changed."""
        inst = _normalise(inst)
        ident = inst.identity
        held = self._entries.get(ident)
        if held is None and self.max_entries is not None and len(self._entries) >= self.max_entries:
            raise RegistryFull(f"the registry holds its limit of {self.max_entries} entries")
        now = self._clock()
        fresh = inst.model_copy(
            update={"healthy": True, "last_heartbeat": _stamp(now), "remove_from_registry": False}
        )
        if held is not None and _visible(held) == _visible(fresh):
            self._beat(ident, held, now)
            return False
        self._set(ident, fresh, now)
        return True

    def heartbeat(self, inst: ModelInstance) -> bool:
        inst = _normalise(inst)
        ident = inst.identity
        held = self._entries.get(ident)
        if held is None:
            return self.register(inst)
        now = self._clock()
        if held.healthy:
            self._beat(ident, held, now)
            return False
        self._set(ident, held.model_copy(update={"healthy": True, "last_heartbeat": _stamp(now)}), now)
        return True

    def deregister(self, model_name: str, host: str, port: int, remove: bool) -> bool:
        """Mark unhealthy, or remove. Returns whether the entry existed."""
        ident = (model_name.strip(), host.strip(), port)
        held = self._entries.get(ident)
        if held is None:
            return False
        if remove:
            del self._entries[ident]
            del self._beats[ident]
            self._handed_out.pop(ident, None)
            self._due.pop(ident, None)
            at = self._at.get(ident[1:])
            if at is not None:
                at.discard(ident)
                if not at:
                    del self._at[ident[1:]]
            self.changes.remove(ident)
        elif held.healthy:
            self._set(ident, held.model_copy(update={"healthy": False}), self._beats[ident])
        return True

    def expire(self) -> list[ModelInstance]:
        """Mark entries whose heartbeat is overdue unhealthy; return them. Looks
        only at the entries that are due (plus one)."""
        deadline = self._clock() - self.heartbeat_timeout
        expired = []
        while self._due:
            ident, beat = next(iter(self._due.items()))
            if beat >= deadline:
                break
            inst = self._entries[ident].model_copy(update={"healthy": False, "last_heartbeat": _stamp(beat)})
            self._set(ident, inst, beat)
            expired.append(inst)
        return expired

    def set_unreachable(self, endpoints: Iterable[tuple[str, int]],
                        draining: Iterable[tuple[str, str, int]] = ()) -> int:
        """The endpoints the probes now find unreachable, and the instances
        being drained (all of them: it replaces the last word). Entries there
        are listed unhealthy; the others as their own state says. Returns how
        many listed entries changed (the change log records none of it).
        Costs what the verdicts changed."""
        down = frozenset((h, int(p)) for h, p in endpoints)
        drained = frozenset((m, h, int(p)) for m, h, p in draining)
        touched = {i for ep in down ^ self._down for i in self._at.get(ep, ())}
        touched |= {i for i in drained ^ self._draining if i in self._entries}
        was = {ident: self._listed(self._entries[ident]).healthy for ident in touched}
        self._down, self._draining = down, drained
        return sum(1 for ident, healthy in was.items() if self._listed(self._entries[ident]).healthy != healthy)

    def quiet_for(self, idents: Iterable[tuple[str, str, int]]) -> float | None:
        """Seconds since any of ``idents`` was last listed healthy to a reader
        (None: never, since this store started)."""
        last = [self._handed_out[i] for i in ((m, h, int(p)) for m, h, p in idents) if i in self._handed_out]
        return self._clock() - max(last) if last else None

    def unreachable(self) -> frozenset[tuple[str, int]]:
        return self._down

    def draining(self) -> frozenset[tuple[str, str, int]]:
        return self._draining

    # ---- reads ----------------------------------------------------------

    def query(self, model_name: str | None = None, healthy_only: bool = False) -> list[ModelInstance]:
        """Entries as DB-GPT's controller lists them, with their last heartbeat
        (and the probes' verdict: see :meth:`set_unreachable`)."""
        listed = [
            (ident, self._listed(inst)) for ident, inst in sorted(self._entries.items())
            if model_name is None or ident[0] == model_name
        ]
        now = self._clock()
        for ident, inst in listed:
            if inst.healthy:
                self._handed_out[ident] = now
        return [
            inst.model_copy(update={"last_heartbeat": _stamp(self._beats[ident])})
            for ident, inst in listed if inst.healthy or not healthy_only
        ]

    def __len__(self) -> int:
        return len(self._entries)

    # ---- persistence ----------------------------------------------------

    def touch_all(self) -> None:
        """Count every entry as heard from now (after a restore)."""
        now = self._clock()
        for ident, inst in self._entries.items():
            self._beat(ident, inst, now)

    def load(self, entries: Iterable[object]) -> list[str]:
        """Start from saved entries (JSON objects). Entries that are not valid
        instances under today's rules (saved by an older, looser version) are
        dropped and described, rather than keeping the registry from starting."""
        listing = screen_entries(list(entries))
        self._entries, self._beats, self._due, self._at = {}, {}, OrderedDict(), {}
        for inst in listing.instances:
            beat = inst.last_heartbeat.timestamp() if inst.last_heartbeat else float("-inf")
            self._entries[inst.identity] = inst
            self._at.setdefault(inst.identity[1:], set()).add(inst.identity)
            self._beat(inst.identity, inst, beat)
        self.changes.load(self._entries.values(), version=0)
        return listing.rejected

    # ---- internals ------------------------------------------------------

    def _set(self, ident: Identity, inst: ModelInstance, beat: float) -> None:
        """A change of the entry's own state: replaced, and recorded."""
        if ident not in self._entries:
            self._at.setdefault(ident[1:], set()).add(ident)
        self._entries[ident] = inst
        self._beat(ident, inst, beat)
        self.changes.put(inst)

    def _listed(self, inst: ModelInstance) -> ModelInstance:
        """How an entry is listed: unhealthy while its endpoint is found
        unreachable, or while it is being drained."""
        return as_listed(inst, self._down, self._draining)

    def _beat(self, ident: Identity, inst: ModelInstance, beat: float) -> None:
        self._beats[ident] = beat
        if inst.check_healthy and inst.healthy:
            self._due[ident] = beat
            self._due.move_to_end(ident)
        else:
            self._due.pop(ident, None)

def _stamp(seconds: float) -> datetime | None:
    return datetime.fromtimestamp(seconds) if seconds != float("-inf") else None


def _normalise(inst: ModelInstance) -> ModelInstance:
    return inst.model_copy(update={"model_name": inst.model_name.strip(), "host": inst.host.strip()})


_VISIBLE_FIELDS = tuple(f for f in ModelInstance.model_fields if f != "last_heartbeat")


def _visible(inst: ModelInstance) -> tuple:
    """The fields a watcher cares about (everything but the heartbeat time)."""
    return tuple(getattr(inst, f) for f in _VISIBLE_FIELDS)
