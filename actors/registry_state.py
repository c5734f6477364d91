"""Where the embedded registry keeps its entries across restarts: a journal in a
key-value store (Ray's GCS KV in production, a dict in tests).

Layout under the registry's key ``K``::

    K/base          {"port": P, "seq": S, "entries": [...]}   the state after segment S
    K/log/000000017 {"seq": 17, "put": [...], "removed": [[model, host, port], ...]}

The journal is a listener of the store's change log (:mod:`coordinator.core.changes`):
each flush writes one segment with the delta since the last one — what changed,
not the whole registry — and a flush is awaited by the writes it carries, so a
registration is answered only once it is saved (group commit: one KV write for
every registration that arrived meanwhile). When the segments since the base
add up to more records than the registry holds (or there are too many of them),
a new base is written and the old segments deleted: saving costs O(1) per change,
amortised. Heartbeats that change nothing are never saved: after a restart every
entry gets a full heartbeat timeout to be heard from again.

A base written before the segments are deleted is safe to crash after: segments
at or below the base's ``seq`` are skipped on restore.
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

from pydantic import TypeAdapter

from coordinator.core.changes import ChangeLog, Delta, Snapshot
from coordinator.core.models import ModelInstance

log = logging.getLogger(__name__)

_INSTANCES = TypeAdapter(list[ModelInstance])
#: Segments beyond this many are folded into a new base, whatever their size;
#: and a journal shorter than this many records is never folded.
MAX_SEGMENTS = 256
COMPACT_AT_LEAST = 1024


class StateStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> None: ...

    async def delete(self, key: str, prefix: bool = False) -> None: ...

    async def keys(self, prefix: str) -> list[str]: ...


class GcsStateStore:
    """Ray's GCS key-value store, which outlives the actor (and is fault tolerant
    when the GCS is), through the GCS client's asynchronous calls (the ones
    Ray's dashboard uses). Its blocking calls hold the GIL while they wait for
    the GCS: from a thread, that stalled the registry's event loop for as long
    as the GCS took to answer."""

    NAMESPACE = b"ray-model-coordinator"

    @staticmethod
    def _client():
        from ray.experimental import internal_kv

        client = internal_kv.internal_kv_get_gcs_client()
        if client is None:
            raise RuntimeError("Ray is not initialised: the GCS is not reachable from here")
        return client

    async def get(self, key: str) -> bytes | None:
        return await self._client().async_internal_kv_get(key.encode(), self.NAMESPACE, timeout=None)

    async def put(self, key: str, value: bytes) -> None:
        await self._client().async_internal_kv_put(key.encode(), value, True, self.NAMESPACE, timeout=None)

    async def delete(self, key: str, prefix: bool = False) -> None:
        await self._client().async_internal_kv_del(key.encode(), prefix, self.NAMESPACE, timeout=None)

    async def keys(self, prefix: str) -> list[str]:
        found = await self._client().async_internal_kv_keys(prefix.encode(), self.NAMESPACE, timeout=None)
        return sorted(k.decode() for k in found)


class MemoryStateStore:
    """A dict, for tests; counts the writes."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.puts = 0
        self.fail = False

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    async def put(self, key: str, value: bytes) -> None:
        if self.fail:
            raise OSError("state store unavailable")
        self.puts += 1
        self.data[key] = value

    async def delete(self, key: str, prefix: bool = False) -> None:
        for k in [k for k in self.data if (k.startswith(key) if prefix else k == key)]:
            del self.data[k]

    async def keys(self, prefix: str) -> list[str]:
        return [k for k in self.data if k.startswith(prefix)]


class SavedState:
    """What a restore found: the port last bound, and the entries (raw JSON)."""

    def __init__(self, port: int, entries: list[object]) -> None:
        self.port, self.entries = port, entries


class Journal:
    def __init__(self, store: StateStore, key: str) -> None:
        self._store = store
        self._key = key
        self._seq = 0  # the last segment written
        self._records_since_base = 0
        self._segments: list[str] = []  # keys of segments since the base
        self._port: int | None = None
        self._legacy = False  # a single-blob state from an older version, to delete
        self.position: tuple[str, int] | None = None  # of the change log, when last saved

    # ---- restore --------------------------------------------------------

    async def restore(self) -> SavedState | None:
        """The saved state, base and segments replayed in order; ``None`` when
        nothing was saved. Also reads the single-blob state older versions wrote."""
        base = await self._store.get(f"{self._key}/base")
        if base:
            saved = json.loads(base)
            port, seq = int(saved["port"]), int(saved["seq"])
            entries = {_ident(e): e for e in saved["entries"] if isinstance(e, dict)}
        else:
            legacy = await self._store.get(self._key)
            if not legacy:
                return None
            saved = json.loads(legacy)
            self._legacy = True
            port, seq = int(saved["port"]), 0
            entries = {_ident(e): e for e in saved["store"]["entries"] if isinstance(e, dict)}
        segments = sorted(await self._store.keys(f"{self._key}/log/"))
        for key in segments:
            blob = await self._store.get(key)
            if not blob:
                continue
            segment = json.loads(blob)
            if int(segment["seq"]) <= seq:
                continue
            for e in segment["put"]:
                entries[_ident(e)] = e
            for ident in segment["removed"]:
                entries.pop(tuple(ident), None)
            seq = int(segment["seq"])
        self._seq, self._port, self._segments = seq, port, segments
        return SavedState(port, list(entries.values()))

    # ---- save -----------------------------------------------------------

    async def start(self, port: int, changes: ChangeLog) -> None:
        """Write a base of the current state (bound ``port`` included)."""
        self._port = port
        await self._write_base(changes.snapshot(), changes)

    async def flush(self, changes: ChangeLog) -> None:
        """Save everything ``changes`` holds that is not saved yet."""
        change = changes.since(self.position)
        if change is None:
            return
        if isinstance(change, Snapshot) or self._compaction_due(change, len(changes)):
            await self._write_base(changes.snapshot(), changes)
            return
        self._seq += 1
        key = f"{self._key}/log/{self._seq:012d}"
        segment = b'{"seq":%d,"put":%s,"removed":%s}' % (
            self._seq, _INSTANCES.dump_json(list(change.upserts)), json.dumps(change.removed).encode())
        await self._store.put(key, segment)
        self._segments.append(key)
        self._records_since_base += len(change.upserts) + len(change.removed)
        self.position = (change.epoch, change.version)

    async def forget(self) -> None:
        await self._store.delete(self._key)
        await self._store.delete(f"{self._key}/", prefix=True)

    def _compaction_due(self, change: Delta, size: int) -> bool:
        records = self._records_since_base + len(change.upserts) + len(change.removed)
        return records > max(size, COMPACT_AT_LEAST) or len(self._segments) >= MAX_SEGMENTS

    async def _write_base(self, snap: Snapshot, changes: ChangeLog) -> None:
        assert self._port is not None
        self._seq += 1
        # Built as bytes: serialising 10,000 entries is one pydantic-core call.
        body = b'{"port":%d,"seq":%d,"entries":%s}' % (self._port, self._seq, _INSTANCES.dump_json(list(snap.instances)))
        await self._store.put(f"{self._key}/base", body)
        self.position = (snap.epoch, snap.version)
        if self._segments:  # the base covers them; a crash before this leaves them skipped on restore
            await self._store.delete(f"{self._key}/log/", prefix=True)
        if self._legacy:
            await self._store.delete(self._key)
        self._segments, self._records_since_base, self._legacy = [], 0, False


def _ident(entry: dict) -> tuple:
    return (str(entry.get("model_name", "")).strip(), str(entry.get("host", "")).strip(), entry.get("port"))
