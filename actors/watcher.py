"""The registry watcher: one per configured source, keeping a versioned copy of
the instances the source lists (a :class:`~coordinator.core.changes.ChangeLog`).

A consumer asks :meth:`RegistryWatcher.listen` for anything newer than the
``(epoch, version)`` it holds and waits up to a timeout (a long poll, as in Ray
Serve's ``LongPollHost``); it gets what changed since (a delta), or everything
when it is new or too far behind (a snapshot). A source that sends changes (the
embedded registry) costs what changed; a polled one (a DB-GPT controller, a
file) is compared entry by entry, and only entries that really changed — not
their heartbeat times — make a new version. When the source fails, the watcher
keeps the last good state, says it is stale, and backs off; a failing source
never empties the set.

A source that has never answered is not empty either: a watcher (re)started
while its source is down answers no listener until its first fetch succeeds
(a consumer keeps what it holds — after a restart, the coordinator's live set
is the memory of what this watcher last said), and its status says stale,
with the error, meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from coordinator.plumbing.process import exit_for_restart, process_info
from actors.sources import Source, SourceError, build_source
from coordinator.core.changes import Change, ChangeLog, Snapshot, identity
from coordinator.core.config import BackoffSettings, RegistrySource
from coordinator.core.liveset import Screened
from coordinator.core.longpoll import ChangeFeed
from coordinator.plumbing.metrics import NoMetrics, RayMetrics
from coordinator.core.models import ModelInstance
from coordinator.core.status import WatcherStatus
from coordinator.core.supervisor import Supervisor

log = logging.getLogger(__name__)

#: A fetch slower than this is logged: the loop is alive but struggling.
SLOW_FETCH_WARNING = 10.0
#: How many refused entries a watcher's status names.
MAX_REJECTED_SHOWN = 10


class RegistryWatcher:
    def __init__(
        self,
        settings: RegistrySource,
        backoff: BackoffSettings | None = None,
        registry_actor: str = "",
        namespace: str = "",
        long_poll: float = 10.0,
        pace: float = 0.0,
        source: Source | None = None,
        clock: Callable[[], float] = time.time,
        export_metrics: bool = False,
        exit_on_fatal: bool = False,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._metrics = RayMetrics() if export_metrics else NoMetrics()
        self._source = source or build_source(settings, registry_actor, namespace, long_poll, pace)
        self._backoff = backoff or BackoffSettings()
        self._clock = clock
        self._sleep = sleep  # the back-off's waits (tests pass one that does not wait)
        self._log: ChangeLog[tuple[str, str, int], ModelInstance] = ChangeLog(identity)
        self._status = WatcherStatus(
            source=settings.name or settings.kind, kind=settings.kind, target=self._source.target
        )
        self._feed = ChangeFeed()
        #: Set by the first successful fetch: until then there is nothing to answer with.
        self._ready = asyncio.Event()
        #: Set by the first fetch that finished, well or badly (for ready()).
        self._tried = asyncio.Event()
        # The fetch loop survives any one failure by itself; anything that
        # escapes it is restarted by the supervisor (counted), and a loop that
        # cannot be kept running ends the actor's process for Ray to restart.
        self._supervisor = Supervisor(
            on_restart=lambda name: self._metrics.loop_restart(f"watcher {self._status.source} {name}"),
            on_fatal=exit_for_restart if exit_on_fatal else None)
        self._supervisor.add("fetch", self._run)
        self._loop_task = asyncio.get_running_loop().create_task(self._supervisor.run())

    # ---- for consumers --------------------------------------------------

    async def listen(self, since: tuple[str, int] | None, timeout: float) -> Change | None:
        """What changed since ``since`` as soon as anything did (a delta, or a
        snapshot for a listener that is new, from another epoch — this watcher
        restarted — or too far behind); ``None`` if nothing changed within
        ``timeout``, and until the source has answered once: an empty snapshot
        from a watcher that never heard its source would tell the listener
        that every instance it holds from this source is gone."""
        changed = await self._feed.wait_until(
            lambda: self._ready.is_set() and since != self._log.position, timeout
        )
        if not changed:
            return None
        return self._log.since(since)

    def snapshot(self) -> Snapshot:
        return self._log.snapshot()

    async def status(self) -> WatcherStatus:
        return self._status

    async def process_info(self) -> dict[str, str | int | None]:
        return process_info()

    async def ready(self, timeout: float) -> WatcherStatus:
        """Wait (up to ``timeout``) until the first fetch has finished, well or
        badly: the status says whether the source answered (``ready``) and, if
        not, why (``stale``, ``last_error``) — so a caller can say at once that
        a source is down instead of waiting out its timeout."""
        try:
            await asyncio.wait_for(self._tried.wait(), timeout)
        except TimeoutError:
            pass
        return self._status

    async def close(self) -> None:
        self._loop_task.cancel()
        await self._source.close()

    # ---- the loop -------------------------------------------------------

    async def _run(self) -> None:
        first = True
        while True:
            started = time.monotonic()
            try:
                instances = await self._source.next(first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop survives any one failure
                self._record_failure(exc)
                first = True
                await self._sleep(self._backoff.delay(self._status.consecutive_failures))
                continue
            first = not self._ready.is_set() and instances is None  # "nothing new" to nothing held: ask again
            elapsed = time.monotonic() - started
            if elapsed > SLOW_FETCH_WARNING and instances is not None:
                log.warning("%s: fetch took %.1f s", self._status.source, elapsed)
            self._record_success(instances)

    def _record_success(self, result: Screened | Change | None) -> None:
        update: dict[str, object] = {}
        if isinstance(result, Screened):  # a whole listing: keep what really changed
            listing = result
            self._log.replace(listing.instances)
            if listing.rejected and len(listing.rejected) != self._status.rejected_entries:
                log.warning("%s: refused %d invalid entries, e.g. %s", self._status.source,
                            len(listing.rejected), listing.rejected[0])
            update = {"rejected_entries": len(listing.rejected),
                      "rejected_examples": listing.rejected[:MAX_REJECTED_SHOWN]}
            self._metrics.refused_entries(self._status.source, len(listing.rejected))
        elif result is not None:  # the source's own changes
            self._log.apply(result)
        answered = result is not None or self._ready.is_set()
        self._status = self._status.model_copy(
            update={
                "version": self._log.version,
                "instances": len(self._log),
                "fetches": self._status.fetches + 1,
                "ready": answered,
                "stale": False,
                "last_success": self._clock(),
                "consecutive_failures": 0,
                "last_error": None,
                **update,
            }
        )
        if answered:
            self._ready.set()
        self._tried.set()
        self._feed.notify()
        self._metrics.watcher(self._status.source, stale=False, failed=False)

    def _record_failure(self, exc: Exception) -> None:
        """Stale, with the error; still not ready if the source never answered
        (listeners get nothing rather than an empty set)."""
        failures = self._status.consecutive_failures + 1
        message = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
        if failures == 1:
            if self._ready.is_set():
                log.warning("%s: source failed, keeping the last snapshot: %s", self._status.source, message)
            else:
                log.warning("%s: source has not answered yet; listeners keep what they hold: %s",
                            self._status.source, message)
        self._status = self._status.model_copy(
            update={
                "stale": True,
                "consecutive_failures": failures,
                "last_error": message,
            }
        )
        self._tried.set()
        self._metrics.watcher(self._status.source, stale=True, failed=True)
