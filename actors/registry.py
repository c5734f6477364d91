"""The embedded registry: DB-GPT's model-controller API, served from a Ray actor.

Real DB-GPT worker managers can use it as their ``controller_addr``; our watchers
follow it by long poll (:meth:`EmbeddedRegistry.wait_for_change`), so a
registration reaches the coordinator in milliseconds instead of a poll interval.

The class runs as a Ray actor (``ray.remote(EmbeddedRegistry)``) and, for tests,
as a plain object on any event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI

from coordinator.longpoll import ChangeFeed
from actors.registry_store import RegistryStore
from actors.serving import HttpServer
from coordinator.config import EmbeddedSource
from coordinator.liveset import Snapshot
from coordinator.models import ModelInstance

log = logging.getLogger(__name__)


def controller_app(registry: EmbeddedRegistry) -> FastAPI:
    """DB-GPT's model-controller HTTP API over ``registry``."""
    app = FastAPI(title="Embedded model registry", docs_url=None, redoc_url=None)

    @app.get("/api/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/controller/models")
    async def list_models(model_name: str | None = None, healthy_only: bool = False) -> list[ModelInstance]:
        return await registry.list_instances(model_name, healthy_only)

    @app.post("/api/controller/models")
    async def register(instance: ModelInstance) -> bool:
        return await registry.register(instance)

    @app.delete("/api/controller/models")
    async def deregister(
        model_name: str, host: str, port: int, remove_from_registry: bool = False
    ) -> bool:
        return await registry.deregister(model_name, host, port, remove_from_registry)

    @app.post("/api/controller/heartbeat")
    async def heartbeat(instance: ModelInstance) -> bool:
        return await registry.heartbeat(instance)

    return app


class EmbeddedRegistry:
    def __init__(self, settings: EmbeddedSource, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._store = RegistryStore(settings.heartbeat_timeout, clock)
        self._epoch = uuid.uuid4().hex
        self._feed = ChangeFeed()
        self._published = self._store.version
        self._http = HttpServer(controller_app(self), settings.host, settings.port)
        loop = asyncio.get_running_loop()
        self._serving = loop.create_task(self._http.start())
        self._expiry = loop.create_task(self._expiry_loop())

    async def ready(self) -> str:
        """The URL workers should use as ``controller_addr``, once serving."""
        await asyncio.shield(self._serving)
        return self._http.url

    # ---- the controller calls (also served over HTTP) -------------------

    async def list_instances(
        self, model_name: str | None = None, healthy_only: bool = False
    ) -> list[ModelInstance]:
        return self._store.query(model_name, healthy_only)

    async def register(self, instance: ModelInstance) -> bool:
        self._store.register(instance)
        self._publish()
        return True

    async def heartbeat(self, instance: ModelInstance) -> bool:
        self._store.heartbeat(instance)
        self._publish()
        return True

    async def deregister(self, model_name: str, host: str, port: int, remove: bool = False) -> bool:
        self._store.deregister(model_name, host, port, remove)
        self._publish()
        return True

    # ---- for watchers ---------------------------------------------------

    def _snapshot(self) -> Snapshot:
        return Snapshot(self._epoch, self._store.version, tuple(self._store.query()))

    async def wait_for_change(
        self, since: tuple[str, int] | None, timeout: float
    ) -> Snapshot | None:
        """The current snapshot as soon as it is newer than ``since`` (an
        ``(epoch, version)`` pair from an earlier answer), or ``None`` when nothing
        changed within ``timeout`` seconds."""
        current = lambda: (self._epoch, self._store.version)  # noqa: E731
        if not await self._feed.wait_until(lambda: since != current(), timeout):
            return None
        return self._snapshot()

    async def close(self) -> None:
        self._expiry.cancel()
        await self._http.stop()

    # ---- internals ------------------------------------------------------

    def _publish(self) -> None:
        """Wake the long polls if the store's version moved since the last call."""
        if self._store.version != self._published:
            self._published = self._store.version
            self._feed.notify()

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
