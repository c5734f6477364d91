"""The coordinator as a Ray actor: the RPC face.

It *holds* a :class:`~coordinator.control.service.CoordinatorService` (with the Ray
links plugged in) and exposes exactly the methods below as Ray methods; nothing
of the service's inside is reachable over Ray.

Created by :func:`coordinator.start` as a named actor with ``max_restarts=-1``.
After a restart ``__init__`` runs again and the service rebuilds its live set
from the watchers (which outlive it) and starts fresh proxies. A background
loop that cannot be restarted in place ends the process, so that Ray restarts
the actor cleanly rather than leaving it answering from a frozen view.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import warnings
from typing import Any

import ray

from actors.serving import HttpServer
from coordinator.control.fleet_page import FleetPage
from coordinator.plumbing.process import exit_for_restart, process_info
from actors.registry_state import GcsStateStore
from coordinator.core.changes import Change
from coordinator.core.config import CoordinatorConfig, EmbeddedSource, is_loopback
from coordinator.core.deployments import Decision, Deployment, DeploymentStatus
from coordinator.plumbing.metrics import RayMetrics
from coordinator.core.models import (
    ApplyResult,
    Endpoint,
    ModelInstance,
    SupportsOutcome,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
)
from coordinator.core.naming import registry_actor, watcher_actor
from coordinator.core.placement import NodeInfo
from coordinator.control.ray_links import RayProxies, RayRegistries, RayWatchers
from coordinator.core.rollout import ApplyOptions, ApplyPlan
from coordinator.control.service import CoordinatorService
from coordinator.core.status import ClusterStatus

log = logging.getLogger(__name__)


class CoordinatorActor:
    def __init__(
        self, config: CoordinatorConfig, name: str, namespace: str, nodes: list[NodeInfo] | None = None
    ) -> None:
        me = ray.get_runtime_context().current_actor
        with warnings.catch_warnings():  # Ray 2.60's property reads its own deprecated actor_id, and warns
            warnings.simplefilter("ignore")
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        watchers = RayWatchers({s.name: watcher_actor(name, s.name) for s in config.registries}, namespace)
        self._ray_proxies = RayProxies(config, me, nodes)
        self._service = CoordinatorService(
            config, watchers, self._ray_proxies, name=name, namespace=namespace, metrics=RayMetrics(),
            store=GcsStateStore(),
            registries=RayRegistries([registry_actor(name, s.name) for s in config.registries
                                      if isinstance(s, EmbeddedSource)], namespace),
            on_fatal=exit_for_restart,
            restarted=restarted,
        )
        self._main = asyncio.get_running_loop().create_task(self._service.run())
        self._page: HttpServer | None = None
        self._page_serving = (asyncio.get_running_loop().create_task(self._serve_page())
                              if config.page.enabled else None)

    async def _serve_page(self) -> None:
        """Serve the fleet page (README, "The fleet page"). A port that is
        taken — by this actor's previous process, still closing — is tried
        again, backing off; the coordinator works on without its page
        meanwhile. Anything else (a TLS file that does not load) is logged
        once, and the page stays off."""
        config = self._service.config
        settings = config.page
        keys = config.page_keys()
        app = FleetPage(self._service.page_snapshot, self._service.fleet_changed, keys,
                        settings.session_hours, secure_cookie=settings.tls is not None)
        failures = 0
        while True:
            server = HttpServer(app, settings.host, settings.port, settings.tls)
            try:
                await server.start()
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    log.error("the fleet page cannot serve on %s:%s (%s); it stays off", settings.host,
                              settings.port, exc)
                    return
                failures += 1
                if failures == 1:
                    log.warning("the fleet page cannot serve on %s:%s yet (%s); trying again",
                                settings.host, settings.port, exc)
                await asyncio.sleep(config.backoff.delay(failures))
        self._page = server
        url = server.url
        if settings.host in ("0.0.0.0", "::"):  # every address: name one a browser can reach
            host = ray.util.get_node_ip_address()
            url = f"{url.split('://')[0]}://{f'[{host}]' if ':' in host else host}:{server.port}"
        if not keys and not is_loopback(settings.host):
            log.warning("the fleet page serves %s with no key (page.allow_open)", url)
        self._service.page_url = url

    # ---- reads ----------------------------------------------------------

    async def get_config(self) -> CoordinatorConfig:
        return self._service.config

    async def ready(self, timeout: float) -> bool:
        return await self._service.ready(timeout)

    async def instances(
        self, model: str | None = None, worker_type: str | None = None, healthy_only: bool = True
    ) -> list[ModelInstance]:
        return await self._service.instances(model, worker_type, healthy_only)

    async def wait_for(self, model: str, count: int, worker_type: str = "llm",
                       timeout: float = 60.0) -> list[ModelInstance]:
        return await self._service.wait_for(model, count, worker_type, timeout)

    async def status(self) -> ClusterStatus:
        return await self._service.status()

    async def page_url(self, timeout: float = 5.0) -> str | None:
        """Where the fleet page serves; None when it is turned off, or not
        serving within ``timeout`` seconds (its port taken)."""
        if self._page_serving is None:
            return None
        try:
            await asyncio.wait_for(asyncio.shield(self._page_serving), timeout)
        except TimeoutError:
            pass
        except Exception:  # it failed to start: logged there; no page
            return None
        return self._service.page_url

    async def routes_since(self, since: tuple[str, int] | None, timeout: float) -> Change | None:
        return await self._service.routes_since(since, timeout)

    # ---- operations -----------------------------------------------------

    async def apply(self, req: WorkerApplyRequest,
                    options: ApplyOptions | None = None) -> ApplyResult | ApplyPlan:
        return await self._service.apply(req, options)

    async def startup(self, req: WorkerStartupRequest, timeout: float | None = None) -> WorkerApplyOutput:
        return await self._service.startup(req, timeout)

    async def shutdown(self, req: WorkerStartupRequest, timeout: float | None = None,
                       drain_timeout: float | None = None) -> WorkerApplyOutput:
        return await self._service.shutdown(req, timeout, drain_timeout)

    async def supports(self) -> list[SupportsOutcome]:
        return await self._service.supports()

    # ---- deployments ----------------------------------------------------

    async def deploy(self, specs: list[Deployment], wait: bool = False, timeout: float | None = None) -> list[int]:
        return await self._service.deploy(specs, wait, timeout)

    async def undeploy(self, key: str, shutdown: bool = False) -> DeploymentStatus:
        return await self._service.undeploy(key, shutdown)

    async def deployments(self) -> list[DeploymentStatus]:
        return await self._service.deployments()

    async def plan_deploy(self, specs: list[Deployment]) -> list[tuple[str, Decision]]:
        return await self._service.plan_deploy(specs)

    async def deployed(self, key: str) -> Deployment | None:
        return self._service.deployed(key)

    # ---- from callers --------------------------------------------------

    async def report_load(self, reporter: str, seq: int, counts: dict[tuple[str, str, int], int],
                          gone: bool = False, applied: tuple[str, int] | None = None,
                          queued: dict[str, int] | None = None) -> dict[tuple[str, str, int], int]:
        """A router's requests in flight per instance (and held per model for
        want of one) and the route table it has applied; the other routers'
        counts (see :meth:`CoordinatorService.report_load`)."""
        return self._service.report_load(reporter, seq, counts, gone, applied, queued)

    async def hold_for(self, key: str) -> float:
        """Seconds to hold a request for ``key`` while it has no instance (0: fail at once)."""
        return self._service.hold_for(key)

    # ---- from proxies ---------------------------------------------------

    async def report_probe(self, endpoint: Endpoint, state: Any) -> None:
        """A proxy says its worker became reachable or unreachable."""
        await self._service.report_probe(endpoint, state)

    # ---- for debugging and tests ----------------------------------------

    async def process_info(self) -> dict[str, str | int | None]:
        """Where the coordinator runs: Ray node and PID (for placement checks and profiling)."""
        return process_info()

    async def proxy_handle(self, host: str, port: int):
        """The proxy actor serving host:port (for debugging), or None."""
        return self._ray_proxies.handle(Endpoint(host, port))

    async def close(self, forget: bool = False) -> None:
        """Stop following and retire every proxy (before the actor is killed).
        The deployments kept in the GCS stay, so a later start of the same name
        brings them back — unless ``forget``."""
        self._main.cancel()
        self._ray_proxies.close()
        if self._page_serving is not None:
            self._page_serving.cancel()
        if self._page is not None:
            await self._page.stop()
        if forget:
            await self._service.forget()
