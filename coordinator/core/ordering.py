"""Per-key order: lifecycle operations on one ``model@worker_type`` run one at a
time, in the order they arrived; operations on different keys run concurrently.
Pure asyncio; no ray.

Each key has a line: the operation running, and those waiting behind it. An
operation identical to one already *waiting* joins it (both callers get its
result: a flood of the same restart is carried out once, not once per
caller); distinct waiting operations are bounded, and one past the bound is
refused at once (:class:`QueueFull`) rather than queued for minutes. An
operation, once queued, belongs to its line, not to its caller: a caller that
stops waiting does not cancel it, and the next operation waits until it ends.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, key: str, depth: int) -> None:
        super().__init__(key, depth)
        self.key, self.depth = key, depth


@dataclass
class _Waiting:
    start: Callable[[], Awaitable[Any]]
    same_as: Hashable | None
    result: asyncio.Future[Any]


@dataclass
class _Line:
    waiting: deque[_Waiting] = field(default_factory=deque)
    driver: asyncio.Task[None] | None = None


class OperationQueue:
    def __init__(self, limit: int = 32, on_depth: Callable[[str, int], None] | None = None) -> None:
        self.limit = limit
        self._lines: dict[str, _Line] = {}
        self._on_depth = on_depth or (lambda key, depth: None)

    async def run(self, key: str, start: Callable[[], Awaitable[T]], same_as: Hashable | None = None) -> T:
        """Queue ``start()`` on ``key``'s line and return its result. With
        ``same_as``, join a waiting operation that has the same value instead.
        Raises :class:`QueueFull` when ``limit`` distinct operations wait."""
        line = self._lines.setdefault(key, _Line())
        joined = next((w for w in line.waiting if same_as is not None and w.same_as == same_as), None)
        if joined is None:
            if len(line.waiting) >= self.limit:
                raise QueueFull(key, len(line.waiting))
            joined = _Waiting(start, same_as, asyncio.get_running_loop().create_future())
            # Retrieved here, so that a result nobody waits for any more is no warning.
            joined.result.add_done_callback(lambda f: f.cancelled() or f.exception())
            line.waiting.append(joined)
            self._on_depth(key, len(line.waiting))
            if line.driver is None:
                line.driver = asyncio.get_running_loop().create_task(self._drive(key, line), name=f"line {key}")
        return await asyncio.shield(joined.result)

    async def _drive(self, key: str, line: _Line) -> None:
        while line.waiting:
            op = line.waiting.popleft()
            self._on_depth(key, len(line.waiting))
            try:
                op.result.set_result(await op.start())
            except Exception as exc:  # the caller's to see
                op.result.set_exception(exc)
        del self._lines[key]

    def busy_keys(self) -> list[str]:
        """Keys with an operation running or waiting."""
        return sorted(self._lines)

    def depths(self) -> dict[str, int]:
        """Distinct operations waiting, per key (running ones not counted)."""
        return {k: len(line.waiting) for k, line in sorted(self._lines.items()) if line.waiting}
