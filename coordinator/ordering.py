"""Per-key serialisation: lifecycle operations on one ``model@worker_type`` run one
at a time, in the order they arrived; operations on different keys run
concurrently. Pure asyncio; no ray."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class KeyedSerializer:
    """A FIFO lock per key, created on first use and dropped when nobody holds or
    waits for it (so the table does not grow with every model ever seen)."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            # asyncio.Lock wakes waiters first-in first-out and does not let a
            # newcomer overtake a waiter, which is the arrival order we promise.
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                del self._locks[key]

    def busy_keys(self) -> list[str]:
        return sorted(self._locks)
