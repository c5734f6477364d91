"""The embedded registry's state, as plain Python: no ray, no HTTP, a clock you pass.

It follows DB-GPT's model controller: registering an existing (key, host, port)
updates it and marks it healthy; a heartbeat from an unknown instance registers
it; deregistering marks an entry unhealthy and removes it only when asked; an
entry with ``check_healthy`` whose last heartbeat is older than the timeout is
marked unhealthy but stays listed.

Every change that a watcher should see bumps :attr:`version`. Heartbeats that
only move ``last_heartbeat`` do not, so a quiet fleet produces no snapshots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from coordinator.liveset import screen_entries
from coordinator.models import ModelInstance

Identity = tuple[str, str, int]


class RegistryFull(Exception):
    """A new entry would take the registry past its limit."""


class RegistryStore:
    def __init__(
        self, heartbeat_timeout: float, clock: Callable[[], float] = time.time, max_entries: int | None = None
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[Identity, ModelInstance] = {}
        self.version = 0

    # ---- writes ---------------------------------------------------------

    def register(self, inst: ModelInstance) -> bool:
        """Add or refresh an entry and mark it healthy. Returns whether the
        visible state changed."""
        inst = _normalise(inst)
        held = self._entries.get(inst.identity)
        if held is None and self.max_entries is not None and len(self._entries) >= self.max_entries:
            raise RegistryFull(f"the registry holds its limit of {self.max_entries} entries")
        fresh = inst.model_copy(
            update={"healthy": True, "last_heartbeat": self._now(), "remove_from_registry": False}
        )
        self._entries[inst.identity] = fresh
        return self._bump(held is None or _visible(held) != _visible(fresh))

    def heartbeat(self, inst: ModelInstance) -> bool:
        inst = _normalise(inst)
        held = self._entries.get(inst.identity)
        if held is None:
            return self.register(inst)
        self._entries[inst.identity] = held.model_copy(
            update={"healthy": True, "last_heartbeat": self._now()}
        )
        return self._bump(not held.healthy)

    def deregister(self, model_name: str, host: str, port: int, remove: bool) -> bool:
        """Mark unhealthy, or remove. Returns whether the entry existed."""
        ident = (model_name.strip(), host.strip(), port)
        held = self._entries.get(ident)
        if held is None:
            return False
        if remove:
            del self._entries[ident]
            self._bump(True)
        else:
            self._entries[ident] = held.model_copy(update={"healthy": False})
            self._bump(bool(held.healthy))
        return True

    def expire(self) -> list[ModelInstance]:
        """Mark entries whose heartbeat is overdue unhealthy; return them."""
        deadline = self._clock() - self.heartbeat_timeout
        expired = []
        for ident, inst in self._entries.items():
            beat = inst.last_heartbeat.timestamp() if inst.last_heartbeat else float("-inf")
            if inst.check_healthy and inst.healthy and beat < deadline:
                self._entries[ident] = inst.model_copy(update={"healthy": False})
                expired.append(self._entries[ident])
        self._bump(bool(expired))
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

    def dump(self) -> dict:
        return {
            "version": self.version,
            "entries": [i.model_dump(mode="json") for i in self._entries.values()],
        }

    def touch_all(self) -> None:
        """Stamp every entry's heartbeat with now (after a restore)."""
        stamp = self._now()
        for ident, inst in self._entries.items():
            self._entries[ident] = inst.model_copy(update={"last_heartbeat": stamp})

    def load(self, state: dict) -> list[str]:
        """Restore a :meth:`dump`. Entries that are not valid instances under
        today's rules (saved by an older, looser version) are dropped and
        described, rather than keeping the registry from starting."""
        self.version = int(state["version"])
        listing = screen_entries(state["entries"])
        self._entries = {inst.identity: inst for inst in listing.instances}
        return listing.rejected

    # ---- internals ------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock())

    def _bump(self, changed: bool) -> bool:
        if changed:
            self.version += 1
        return changed


def _normalise(inst: ModelInstance) -> ModelInstance:
    return inst.model_copy(update={"model_name": inst.model_name.strip(), "host": inst.host.strip()})


def _visible(inst: ModelInstance) -> dict:
    """The fields a watcher cares about (everything but the heartbeat time)."""
    return inst.model_dump(exclude={"last_heartbeat"})
