"""Versioned state that travels as changes. Pure: imports neither ray nor httpx.

A :class:`ChangeLog` holds a keyed map (the registry's entries, a watcher's
listing, the coordinator's live set) and a bounded log of which key changed at
each version. A listener that holds ``(epoch, version)`` asks :meth:`ChangeLog.since`
and gets:

- ``None`` — nothing newer;
- a :class:`Delta` — the current value of every key changed since its version,
  and the keys removed since; it costs what changed, not the size of the map;
- a :class:`Snapshot` — the whole map, when the listener is new, from another
  epoch (the holder restarted), or further behind than the log reaches.

This is Ray Serve's long-poll contract (``LongPollHost``) with the payload made
incremental. Deltas are coalesced: a key that changed five times since the
listener's version is sent once, with its current value, so applying a delta
(:meth:`ChangeLog.apply`) always reproduces the holder's state exactly.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from itertools import islice
from typing import Any, Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: How many changes a log remembers; a listener further behind gets a snapshot.
DEFAULT_RETAIN = 8192


class Snapshot(NamedTuple):
    """The whole state at one version. ``epoch`` changes when its holder restarts,
    so a listener with an old version asks again from scratch."""

    epoch: str
    version: int
    instances: tuple[Any, ...]


class Delta(NamedTuple):
    """What changed between ``since`` and ``version`` (same epoch): the current
    value of every key that changed and still exists, and the keys removed."""

    epoch: str
    since: int
    version: int
    upserts: tuple[Any, ...]
    removed: tuple[Any, ...]


Change = Snapshot | Delta


class ChangeLog(Generic[K, V]):
    """A map whose every visible change bumps a version and is remembered (the
    key only) for the last ``retain`` versions. ``key`` derives a value's key,
    so snapshots and deltas carry values alone."""

    def __init__(self, key: Callable[[V], K], epoch: str | None = None, retain: int = DEFAULT_RETAIN) -> None:
        self._key = key
        self.epoch = epoch or uuid.uuid4().hex
        self.version = 0
        self._items: dict[K, V] = {}
        # (version, key) for the newest `retain` changes; versions are consecutive.
        self._log: deque[tuple[int, K]] = deque(maxlen=retain)

    # ---- reads ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def values(self) -> Iterable[V]:
        return self._items.values()

    def items(self) -> Iterable[tuple[K, V]]:
        return self._items.items()

    @property
    def position(self) -> tuple[str, int]:
        return (self.epoch, self.version)

    # ---- writes ---------------------------------------------------------

    def put(self, value: V) -> bool:
        """Set a value under its key; a value equal to the one held is no change."""
        key = self._key(value)
        held = self._items.get(key)
        if held is value or held == value:
            return False
        self._items[key] = value
        self._record(key)
        return True

    def remove(self, key: K) -> bool:
        if key not in self._items:
            return False
        del self._items[key]
        self._record(key)
        return True

    def replace(self, values: Iterable[V]) -> list[K]:
        """Make the map hold exactly ``values``; one version per key that changed.
        Returns the keys that changed (for the polled sources, which only ever
        see whole listings). Costs one comparison per value."""
        seen: set[K] = set()
        changed: list[K] = []
        for value in values:
            key = self._key(value)
            seen.add(key)
            if self.put(value):
                changed.append(key)
        for key in [k for k in self._items if k not in seen]:
            self.remove(key)
            changed.append(key)
        return changed

    def apply(self, change: Change) -> list[K]:
        """Follow another log: apply its delta (or snapshot) here, recording
        each change in this log too. Returns the keys that changed."""
        if isinstance(change, Delta):
            changed = [self._key(v) for v in change.upserts if self.put(v)]
            return changed + [k for k in change.removed if self.remove(k)]
        return self.replace(change.instances)

    def load(self, values: Iterable[V], version: int) -> None:
        """Start over from a saved state at ``version`` (nothing to tell anyone:
        listeners of the old epoch get a snapshot)."""
        self._items = {self._key(v): v for v in values}
        self.version = version
        self._log.clear()

    # ---- for listeners --------------------------------------------------

    def since(self, position: tuple[str, int] | None) -> Change | None:
        """What a listener at ``position`` needs to catch up, or ``None``."""
        if position == self.position:
            return None
        if position is not None and position[0] == self.epoch:
            behind = self.version - position[1]
            if 0 < behind <= len(self._log):
                return self._delta(position[1], behind)
        return self.snapshot()

    def snapshot(self) -> Snapshot:
        return Snapshot(self.epoch, self.version, tuple(self._items[k] for k in sorted(self._items)))

    def _delta(self, since: int, behind: int) -> Delta:
        keys = dict.fromkeys(key for _, key in islice(reversed(self._log), behind))
        upserts = tuple(self._items[k] for k in keys if k in self._items)
        removed = tuple(k for k in keys if k not in self._items)
        return Delta(self.epoch, since, self.version, upserts, removed)

    def _record(self, key: K) -> None:
        self.version += 1
        self._log.append((self.version, key))


def identity(value: Any) -> Any:
    """The key of a registry entry: ``(model_name, host, port)``."""
    return value.identity
