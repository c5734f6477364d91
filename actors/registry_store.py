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
(a :class:`~coordinator.changes.ChangeLog`), from which watchers and the
journal take deltas. Heartbeats that only move ``last_heartbeat`` record
nothing, so a quiet fleet produces no changes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime

from coordinator.changes import ChangeLog, identity
from coordinator.liveset import screen_entries
from coordinator.models import ModelInstance

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
        self._entries: dict[Identity, ModelInstance] = {}
        # Entries that can expire (healthy, check_healthy), oldest heartbeat first.
        self._due: OrderedDict[Identity, float] = OrderedDict()
        #: Every visible change; watchers and the journal read deltas from it.
        self.changes: ChangeLog[Identity, ModelInstance] = ChangeLog(identity, epoch)

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
        fresh = inst.model_copy(
            update={"healthy": True, "last_heartbeat": self._now(), "remove_from_registry": False}
        )
        return self._set(ident, fresh, visible=held is None or _visible(held) != _visible(fresh))

    def heartbeat(self, inst: ModelInstance) -> bool:
        inst = _normalise(inst)
        held = self._entries.get(inst.identity)
        if held is None:
            return self.register(inst)
        fresh = held.model_copy(update={"healthy": True, "last_heartbeat": self._now()})
        return self._set(inst.identity, fresh, visible=not held.healthy)

    def deregister(self, model_name: str, host: str, port: int, remove: bool) -> bool:
        """Mark unhealthy, or remove. Returns whether the entry existed."""
        ident = (model_name.strip(), host.strip(), port)
        held = self._entries.get(ident)
        if held is None:
            return False
        if remove:
            del self._entries[ident]
            self._due.pop(ident, None)
            self.changes.remove(ident)
        else:
            self._set(ident, held.model_copy(update={"healthy": False}), visible=bool(held.healthy))
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
            inst = self._entries[ident].model_copy(update={"healthy": False})
            self._set(ident, inst, visible=True)
            expired.append(inst)
        return expired

    # ---- reads ----------------------------------------------------------

    def query(self, model_name: str | None = None, healthy_only: bool = False) -> list[ModelInstance]:
        return [
            inst
            for ident, inst in sorted(self._entries.items())
            if (model_name is None or ident[0] == model_name) and (inst.healthy or not healthy_only)
        ]

    def __len__(self) -> int:
        return len(self._entries)

    # ---- persistence ----------------------------------------------------

    def touch_all(self) -> None:
        """Stamp every entry's heartbeat with now (after a restore)."""
        stamp = self._now()
        for ident, inst in list(self._entries.items()):
            self._set(ident, inst.model_copy(update={"last_heartbeat": stamp}), visible=False)

    def load(self, entries: Iterable[object]) -> list[str]:
        """Start from saved entries (JSON objects). Entries that are not valid
        instances under today's rules (saved by an older, looser version) are
        dropped and described, rather than keeping the registry from starting."""
        listing = screen_entries(list(entries))
        self._entries, self._due = {}, OrderedDict()
        for inst in listing.instances:
            self._set(inst.identity, inst, visible=False)
        self.changes.load(self._entries.values(), version=0)
        return listing.rejected

    # ---- internals ------------------------------------------------------

    def _set(self, ident: Identity, inst: ModelInstance, visible: bool) -> bool:
        self._entries[ident] = inst
        if inst.check_healthy and inst.healthy:
            beat = inst.last_heartbeat.timestamp() if inst.last_heartbeat else float("-inf")
            self._due[ident] = beat
            self._due.move_to_end(ident)
        else:
            self._due.pop(ident, None)
        if visible:
            self.changes.put(inst)
        return visible

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock())


def _normalise(inst: ModelInstance) -> ModelInstance:
    return inst.model_copy(update={"model_name": inst.model_name.strip(), "host": inst.host.strip()})


_VISIBLE_FIELDS = tuple(f for f in ModelInstance.model_fields if f != "last_heartbeat")


def _visible(inst: ModelInstance) -> tuple:
    """The fields a watcher cares about (everything but the heartbeat time)."""
    return tuple(getattr(inst, f) for f in _VISIBLE_FIELDS)
