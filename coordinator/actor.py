"""The coordinator as a Ray actor: the service with Ray links plugged in.

Created by :func:`coordinator.start` as a named actor with ``max_restarts=-1``.
After a restart ``__init__`` runs again and the service rebuilds its live set from
the watchers (which outlive it) and starts fresh proxies.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from actors.process import process_info
from actors.registry_state import GcsStateStore
from coordinator.config import CoordinatorConfig, EmbeddedSource
from coordinator.metrics import RayMetrics
from coordinator.models import Endpoint
from coordinator.naming import registry_actor, watcher_actor
from coordinator.placement import NodeInfo
from coordinator.ray_links import RayProxies, RayRegistries, RayWatchers
from coordinator.service import CoordinatorService

log = logging.getLogger(__name__)


class CoordinatorActor(CoordinatorService):
    def __init__(
        self, config: CoordinatorConfig, name: str, namespace: str, nodes: list[NodeInfo] | None = None
    ) -> None:
        me = ray.get_runtime_context().current_actor
        watchers = RayWatchers({s.name: watcher_actor(name, s.name) for s in config.registries}, namespace)
        self._ray_proxies = RayProxies(config, me, nodes)
        super().__init__(config, watchers, self._ray_proxies, name=name, namespace=namespace, metrics=RayMetrics(),
                         store=GcsStateStore(),
                         registries=RayRegistries([registry_actor(name, s.name) for s in config.registries
                                                   if isinstance(s, EmbeddedSource)], namespace))
        self._main = asyncio.get_running_loop().create_task(self._run_logged())

    async def _run_logged(self) -> None:
        try:
            await self.run()
        except Exception:
            log.exception("coordinator loop stopped")
            raise

    async def process_info(self) -> dict[str, str | int | None]:
        """Where the coordinator runs: Ray node and PID (for placement checks and profiling)."""
        return process_info()

    async def proxy_handle(self, host: str, port: int):
        """The proxy actor serving host:port (for debugging), or None."""
        return self._ray_proxies.handle(Endpoint(host, port))

    async def get_config(self) -> CoordinatorConfig:
        return self.config

    async def close(self, forget: bool = False) -> None:
        """Stop following and retire every proxy (before the actor is killed).
        The deployments kept in the GCS stay for the next start of this name,
        unless ``forget``."""
        self._main.cancel()
        self._ray_proxies.close()
        if forget:
            await self._keeper.forget()
