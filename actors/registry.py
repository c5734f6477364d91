"""The embedded registry: DB-GPT's model-controller API, served from a Ray actor.

Real DB-GPT worker managers can use it as their ``controller_addr``; our watchers
follow it by long poll (:meth:`EmbeddedRegistry.wait_for_change`), so a
registration reaches the coordinator in milliseconds instead of a poll interval.

The class runs as a Ray actor (``ray.remote(EmbeddedRegistry)``) and, for tests,
as a plain object on any event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from coordinator.plumbing.process import exit_for_restart, process_info
from actors.registry_state import GcsStateStore, Journal
from actors.registry_store import RegistryStore
from coordinator.core.changes import Change
from coordinator.core.longpoll import ChangeFeed
from actors.controller_api import RegistryUnavailable, controller_app
from actors.serving import HttpServer, serve_until_signalled
from coordinator.core.config import EmbeddedSource
from coordinator.core.models import ModelInstance
from coordinator.core.supervisor import Supervisor
from coordinator.plumbing.metrics import NoMetrics, RayMetrics

log = logging.getLogger(__name__)


#: Seconds a write waits for the journal before it is refused (503), and
#: between attempts to save after a failure.
SAVE_TIMEOUT = 10.0
SAVE_RETRY = 1.0
#: Seconds the journal waits after a change before saving it, so that a burst
#: of writes shares one key-value write (each costs the GCS a round trip).
COMMIT_WINDOW = 0.002


class EmbeddedRegistry:
    """With a ``state`` (a :class:`Journal`, or the GCS key to keep one under),
    every write is saved before it is answered, and a restarted registry actor
    comes back on the same address with every acknowledged entry."""

    def __init__(
        self,
        settings: EmbeddedSource,
        state: Journal | str | None = None,
        clock: Callable[[], float] = time.time,
        exit_on_fatal: bool = False,
        export_metrics: bool = False,
    ) -> None:
        self._metrics = RayMetrics() if export_metrics else NoMetrics()
        self._settings = settings
        self._journal = Journal(GcsStateStore(), state) if isinstance(state, str) else state
        self._store = RegistryStore(settings.heartbeat_timeout, clock, max_entries=settings.max_instances)
        self._feed = ChangeFeed()
        self._published = self._store.changes.position
        self._http: HttpServer | None = None
        #: Set once the saved state is loaded (at once without a journal): until
        #: then the store is empty because nothing is loaded yet, not because
        #: nothing is registered, and no watcher is told otherwise.
        self._restored = asyncio.Event()
        if self._journal is None:
            self._restored.set()
        loop = asyncio.get_running_loop()
        self._fatal = exit_for_restart if exit_on_fatal else None
        self._serving = loop.create_task(self._start())
        self._serving.add_done_callback(self._start_ended)
        self._journal_started = asyncio.Event()
        # Its loops under a supervisor: restarted (counted) after an unexpected
        # failure; one that cannot be kept running ends the actor for Ray to restart.
        self._supervisor = Supervisor(
            on_restart=lambda name: self._metrics.loop_restart(f"registry {name}"),
            on_fatal=exit_for_restart if exit_on_fatal else None)
        self._supervisor.add("expiry", self._expiry_loop)
        if self._journal is not None:
            self._supervisor.add("save", self._save_loop)
        self._loops = loop.create_task(self._supervisor.run())
        # Writes waiting for the journal: (version, future), oldest first.
        self._unsaved: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def _start(self) -> None:
        port = self._settings.port
        if self._journal is not None:
            saved = await self._journal.restore()
            if saved is not None:
                dropped = self._store.load(saved.entries)
                if dropped:
                    log.warning("registry dropped %d saved entries that are no longer valid, e.g. %s",
                                len(dropped), dropped[0])
                # Workers were not silent; the registry was away. Give them a
                # full timeout to be heard from again.
                self._store.touch_all()
                self._published = self._store.changes.position
                port = port or saved.port
                log.warning("registry restored %d entries; serving again on port %s", len(self._store), port)
            self._restored.set()
        self._http = HttpServer(controller_app(self, self._settings), self._settings.host, port, self._settings.tls)
        await self._http.start()
        if self._journal is not None:
            await self._journal.start(self._http.port, self._store.changes)
            self._acknowledge_saved()  # a write that arrived while the base was written
            self._journal_started.set()

    def _start_ended(self, task: asyncio.Task[None]) -> None:
        """A registry that could not restore or serve must not look alive:
        as an actor it ends its process (Ray starts it again, and the restore
        is tried afresh); ``ready()`` raises the cause meanwhile."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("the registry could not start: %s", task.exception(), exc_info=task.exception())
        # A first start reports its failure to whoever started it (ready()
        # raises the cause; the installer removes what it created). A restart
        # by Ray has nobody waiting: it ends the process, for Ray to try again.
        if self._fatal is not None and _restarted():
            self._fatal("start", task.exception())

    async def process_info(self) -> dict[str, str | int | None]:
        return process_info()

    async def ready(self) -> str:
        """The URL workers should use as ``controller_addr``, once serving."""
        await asyncio.shield(self._serving)
        assert self._http is not None
        return self._http.url

    # ---- the controller calls (also served over HTTP) -------------------

    async def list_instances(
        self, model_name: str | None = None, healthy_only: bool = False
    ) -> list[ModelInstance]:
        return self._store.query(model_name, healthy_only)

    async def register(self, instance: ModelInstance) -> bool:
        self._store.register(instance)
        return await self._acknowledge()

    async def heartbeat(self, instance: ModelInstance) -> bool:
        self._store.heartbeat(instance)
        return await self._acknowledge()

    async def deregister(self, model_name: str, host: str, port: int, remove: bool = False) -> bool:
        self._store.deregister(model_name, host, port, remove)
        return await self._acknowledge()

    # ---- the coordinator's word ------------------------------------------

    async def set_unreachable(self, endpoints: list[tuple[str, int]],
                              draining: list[tuple[str, str, int]] | None = None) -> int:
        """The endpoints the coordinator's probes find unreachable, and the
        instances it is draining (each the whole set, replacing the last):
        their entries are listed unhealthy to DB-GPT's readers until that
        word is lifted (see RegistryStore.set_unreachable). Not saved, and not
        a change the coordinator's watcher hears: it said it. A restarted
        registry hears it again from the coordinator."""
        return self._store.set_unreachable(endpoints, draining or ())

    async def quiet_for(self, instances: list[tuple[str, str, int]]) -> float | None:
        """Seconds since any of ``instances`` was last listed healthy to a
        reader (None: never since this registry started)."""
        return self._store.quiet_for(instances)

    # ---- for watchers ---------------------------------------------------

    async def wait_for_change(self, since: tuple[str, int] | None, timeout: float) -> Change | None:
        """What changed since ``since`` (an ``(epoch, version)`` from an earlier
        answer) as soon as anything did: a :class:`Delta`, or a :class:`Snapshot`
        for a listener that is new or too far behind; ``None`` when nothing
        changed within ``timeout`` seconds. Right after a restart, waits for
        the saved state: an empty answer then would say every entry is gone."""
        if not self._restored.is_set():
            try:
                await asyncio.wait_for(self._restored.wait(), timeout)
            except TimeoutError:
                raise RegistryUnavailable(f"the registry has not restored its saved state within {timeout:g} s") \
                    from None
        changes = self._store.changes
        if not await self._feed.wait_until(lambda: since != changes.position, timeout):
            return None
        return changes.since(since)

    async def close(self) -> None:
        self._loops.cancel()
        if self._http is not None:
            await self._http.stop()

    async def forget(self) -> None:
        """Close, and delete the saved state (the registry is being removed)."""
        await self.close()
        if self._journal is not None:
            await self._journal.forget()

    # ---- internals ------------------------------------------------------

    async def _acknowledge(self) -> bool:
        """Tell the listeners, then answer once the registry's current state is
        saved (when there is a journal): an answered write is never lost, even
        one that changed nothing because an unsaved write had made the change.
        A write waits for its own version only, woken by the flush that saves
        it, not by every change."""
        self._publish()
        if self._journal is None:
            return True
        version = self._store.changes.version
        if self._saved_version() >= version:
            return True
        saved = asyncio.get_running_loop().create_future()
        self._unsaved.append((version, saved))
        try:
            async with asyncio.timeout(SAVE_TIMEOUT):
                await saved
        except TimeoutError:
            raise RegistryUnavailable(f"the registry could not save the change within {SAVE_TIMEOUT:g} s") from None
        return True

    def _saved_version(self) -> int:
        position = self._journal.position if self._journal is not None else None
        return position[1] if position is not None and position[0] == self._store.changes.epoch else -1

    def _publish(self) -> None:
        """Wake the long polls (and the journal) if the store changed."""
        if self._store.changes.position != self._published:
            self._published = self._store.changes.position
            self._feed.notify()

    async def _save_loop(self) -> None:
        """Save what changed, one journal segment per pass: a burst of writes
        shares one KV write (group commit)."""
        assert self._journal is not None
        await self._journal_started.wait()
        journal, changes = self._journal, self._store.changes
        while True:
            await self._feed.wait_until(lambda: journal.position != changes.position, timeout=3600)
            await asyncio.sleep(COMMIT_WINDOW)  # let the writes arriving meanwhile share this flush
            try:
                await journal.flush(changes)
            except Exception:
                log.exception("saving the registry state failed; retrying")
                await asyncio.sleep(SAVE_RETRY)
                continue
            self._acknowledge_saved()

    def _acknowledge_saved(self) -> None:
        """Answer the writes the journal now holds."""
        saved = self._saved_version()
        while self._unsaved and self._unsaved[0][0] <= saved:
            _, done = self._unsaved.popleft()
            if not done.done():  # (a write that gave up waiting is done)
                done.set_result(None)

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.heartbeat_interval)
            try:
                expired = self._store.expire()
            except Exception:
                log.exception("registry expiry pass failed")
                continue
            for inst in expired:
                log.warning(
                    "%s at %s:%s missed heartbeats for %ss; marked unhealthy",
                    inst.model_name, inst.host, inst.port, self._settings.heartbeat_timeout,
                )
            self._publish()


def _restarted() -> bool:
    """Whether this process is a Ray actor started again after a crash."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not an actor
        return False


async def _serve(settings: EmbeddedSource) -> None:
    registry = EmbeddedRegistry(settings)
    await serve_until_signalled(await registry.ready(), registry.close)


def main(argv: list[str] | None = None) -> None:
    """Serve the registry as a plain process, without Ray: a stand-in for a
    DB-GPT model controller (``python -m actors.registry --port 8000``)."""
    parser = argparse.ArgumentParser(prog="python -m actors.registry", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--heartbeat-interval", type=float, default=20.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=60.0)
    parser.add_argument("--token-env", metavar="NAME",
                        help="require 'Authorization: Bearer <token>' for writes; the token is in this env var")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(EmbeddedSource(
        host=args.host, port=args.port,
        heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
        token={"env": args.token_env} if args.token_env else None,
    )))


if __name__ == "__main__":
    main()
