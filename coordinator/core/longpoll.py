"""The one long-poll primitive: wait until a version moves, or a timeout passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class ChangeFeed:
    """Wakes every waiter on :meth:`notify`. Waiters re-check their condition, so
    a notify that races a new waiter is never lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Return True as soon as ``done()`` holds, False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not done():
            event = self._event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return done()
        return True

    async def next(self, timeout: float) -> bool:
        """Return True at the next :meth:`notify`, False after ``timeout`` s."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        return True
