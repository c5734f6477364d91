"""The Ray side of the coordinator: the only module that calls ``.remote()`` on
watchers and proxies, and that turns Ray's exceptions about them into
:class:`~coordinator.control.service.LinkError` (in the manner of Ray Serve's
``ActorReplicaWrapper``)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.proxy import WorkerProxy
from coordinator.core.config import CoordinatorConfig, WorkerAccess
from coordinator.core.liveset import Snapshot
from coordinator.core.models import Endpoint
from coordinator.core.placement import NodeInfo, proxy_node
from coordinator.control.service import LinkError
from coordinator.core.status import WatcherStatus

log = logging.getLogger(__name__)

#: Extra seconds a watcher has to answer a long poll beyond its timeout.
LISTEN_GRACE = 10.0
#: Seconds between refreshes of the table of Ray nodes used to place proxies.
NODE_REFRESH = 30.0
#: Seconds a drain waits for a registry to say when it last listed an instance.
QUIET_WAIT = 5.0
#: A proxy that lived this long before dying was not crash-looping: its
#: replacement starts at once. One that died sooner is replaced after a
#: back-off that doubles with each quick death (the config's ``backoff``).
STABLE_LIFETIME = 60.0


class RayWatchers:
    """Named watcher actors, looked up again after any failure (they restart)."""

    def __init__(self, actor_names: dict[str, str], namespace: str) -> None:
        self._names = actor_names
        self._namespace = namespace
        self._handles: dict[str, Any] = {}

    def _handle(self, source: str) -> Any:
        if source not in self._handles:
            self._handles[source] = ray.get_actor(self._names[source], namespace=self._namespace)
        return self._handles[source]

    async def _call(self, source: str, method: str, *args: Any, deadline: float) -> Any:
        try:
            ref = getattr(self._handle(source), method).remote(*args)
            return await asyncio.wait_for(ref, deadline)
        except (RayError, ValueError, TimeoutError) as exc:
            self._handles.pop(source, None)
            raise LinkError(f"watcher {self._names[source]!r}: {type(exc).__name__}: {exc}") from exc

    async def listen(self, source: str, since: tuple[str, int] | None, timeout: float) -> Snapshot | None:
        return await self._call(source, "listen", since, timeout, deadline=timeout + LISTEN_GRACE)

    async def status(self, source: str) -> WatcherStatus:
        return await self._call(source, "status", deadline=5.0)


class RayRegistries:
    """The embedded registry actors, told which endpoints the probes find
    unreachable. Fire and forget: a registry that misses a word hears the
    whole set again at the next change or resync."""

    def __init__(self, actor_names: list[str], namespace: str) -> None:
        self._names = actor_names
        self._namespace = namespace
        self._handles: dict[str, Any] = {}
        self._pending: set[Any] = set()

    @property
    def present(self) -> bool:
        return bool(self._names)

    def tell(self, unreachable: frozenset[Endpoint], draining: frozenset[tuple[str, str, int]] = frozenset()) -> None:
        endpoints = sorted(tuple(ep) for ep in unreachable)
        drained = sorted(draining)
        for name in self._names:
            try:
                if name not in self._handles:
                    self._handles[name] = ray.get_actor(name, namespace=self._namespace)
                ref = self._handles[name].set_unreachable.remote(endpoints, drained)
            except (RayError, ValueError) as exc:
                self._handles.pop(name, None)
                log.info("registry %r not told of unreachable endpoints: %s", name, exc)
                continue
            task = asyncio.ensure_future(self._settle(name, ref))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def quiet_for(self, instances: list[tuple[str, str, int]]) -> float | None:
        """The least time since any registry listed one of ``instances``
        healthy to a reader; 0.0 when a registry cannot say (assume it just
        did). The registries are asked at once, each for QUIET_WAIT at most."""

        async def ask(name: str) -> float | None:
            try:
                if name not in self._handles:
                    self._handles[name] = ray.get_actor(name, namespace=self._namespace)
                return await asyncio.wait_for(self._handles[name].quiet_for.remote(instances), QUIET_WAIT)
            except (RayError, ValueError, TimeoutError) as exc:
                self._handles.pop(name, None)
                log.info("registry %r did not say when it last listed %s: %s", name, instances, exc)
                return 0.0

        answers = await asyncio.gather(*(ask(name) for name in self._names))
        quiet = [a for a in answers if a is not None]
        return min(quiet) if quiet else None

    async def _settle(self, name: str, ref: Any) -> None:
        try:
            await ref
        except RayError as exc:
            self._handles.pop(name, None)
            log.info("registry %r did not take the unreachable endpoints: %s", name, exc)


class _ReportTo:
    """A proxy's probe listener: forwards reachability changes to the coordinator."""

    def __init__(self, coordinator: Any) -> None:
        self._coordinator = coordinator

    def __call__(self, endpoint: Endpoint, state: Any) -> None:
        self._coordinator.report_probe.remote(tuple(endpoint), state)


class RayProxies:
    """One ``WorkerProxy`` actor per endpoint, owned by the coordinator actor (so
    they die with it and are rebuilt after its restart). A proxy found dead is
    replaced at once; the call that found it reports the failure."""

    def __init__(self, config: CoordinatorConfig, coordinator: Any, nodes: list[NodeInfo] | None = None) -> None:
        self._config = config
        self._report = _ReportTo(coordinator)
        self._nodes = list(nodes or [])
        self._node_refresh = asyncio.get_running_loop().create_task(self._refresh_nodes())
        self._handles: dict[Endpoint, Any] = {}
        self._access: dict[Endpoint, WorkerAccess] = {}
        self._lifelines: dict[Endpoint, asyncio.Task[None]] = {}
        self._born: dict[Endpoint, float] = {}  # when its current proxy was started (monotonic)
        self._quick_deaths: dict[Endpoint, int] = {}  # deaths in a row, each soon after a start
        self._actor_cls = ray.remote(WorkerProxy)

    def endpoints(self) -> set[Endpoint]:
        return set(self._handles)

    def handle(self, endpoint: Endpoint) -> Any:
        return self._handles.get(endpoint)

    def ensure(self, endpoint: Endpoint, access: WorkerAccess) -> None:
        """A live proxy for ``endpoint``: started if there is none, or if the
        one there is no longer followed (its lifeline ended without a retire)."""
        lifeline = self._lifelines.get(endpoint)
        if endpoint not in self._handles or lifeline is None or lifeline.done():
            if endpoint in self._handles:
                log.warning("proxy for %s was no longer followed; starting a new one", endpoint)
            self._access.setdefault(endpoint, access)
            self._spawn(endpoint)

    def _spawn(self, endpoint: Endpoint) -> None:
        handle = self._new_proxy(endpoint, self._access[endpoint])
        self._handles[endpoint] = handle
        self._born[endpoint] = time.monotonic()
        self._lifelines[endpoint] = asyncio.get_running_loop().create_task(
            self._follow_lifeline(endpoint, handle), name=f"lifeline {endpoint}"
        )

    async def _follow_lifeline(self, endpoint: Endpoint, handle: Any) -> None:
        """Replace the proxy as soon as it dies, not at the next call to it —
        after a back-off when it keeps dying soon after it starts."""
        while True:
            try:
                await handle.lifeline.remote()
                return  # closed on purpose
            except ActorDiedError as exc:
                if self._handles.get(endpoint) is not handle:
                    return
                lived = time.monotonic() - self._born.get(endpoint, 0.0)
                quick = 0 if lived >= STABLE_LIFETIME else self._quick_deaths.get(endpoint, 0) + 1
                self._quick_deaths[endpoint] = quick
                delay = self._config.backoff.delay(quick - 1) if quick > 1 else 0.0
                log.warning("proxy for %s died after %.0f s (%s); starting a new one in %.1f s",
                            endpoint, lived, _first_line(exc), delay)
                await asyncio.sleep(delay)
                await self._refresh_nodes_once()  # its node may be the one that died
                if self._handles.get(endpoint) is handle:
                    self._spawn(endpoint)
                return
            except RayError:  # unavailable for a moment; it may come back
                await asyncio.sleep(1.0)
            except Exception:  # the follower survives; this is a bug worth a traceback
                log.exception("following the proxy for %s failed", endpoint)
                await asyncio.sleep(1.0)

    async def _refresh_nodes(self) -> None:
        """Keep the node table current (nodes join and leave)."""
        while True:
            await self._refresh_nodes_once()
            await asyncio.sleep(NODE_REFRESH)

    async def _refresh_nodes_once(self) -> None:
        try:  # ray.nodes() is a blocking GCS call: keep it off the loop
            rows = await asyncio.to_thread(ray.nodes)
            self._nodes = [NodeInfo.from_ray(r) for r in rows]
        except Exception:
            log.exception("could not refresh the node table")

    def _new_proxy(self, endpoint: Endpoint, access: WorkerAccess) -> Any:
        placement = self._config.placement
        node = proxy_node(endpoint.host, self._nodes, placement.host_resources, placement.colocate_proxies)
        # Pinned (not soft): Ray's soft affinity was seen to place a 0-CPU actor
        # on another node while the preferred one was alive. Only nodes the table
        # says are alive are chosen, and the table is refreshed before a dead
        # proxy is replaced, so a proxy is not pinned to a node that is gone.
        strategy = NodeAffinitySchedulingStrategy(node, soft=False) if node else "DEFAULT"
        return self._actor_cls.options(num_cpus=0, max_restarts=0, scheduling_strategy=strategy).remote(
            endpoint.host,
            endpoint.port,
            timeouts=self._config.timeouts,
            probe=self._config.probe,
            headers=self._config.headers,
            access=access,
            on_probe_change=self._report,
            export_metrics=True,
        )

    def retire(self, endpoint: Endpoint) -> None:
        handle = self._handles.pop(endpoint, None)
        self._access.pop(endpoint, None)
        self._born.pop(endpoint, None)
        self._quick_deaths.pop(endpoint, None)
        lifeline = self._lifelines.pop(endpoint, None)
        if lifeline is not None:
            lifeline.cancel()
        if handle is not None:
            ray.kill(handle, no_restart=True)

    async def call(self, endpoint: Endpoint, method: str, *args: Any, deadline: float) -> Any:
        handle = self._handles.get(endpoint)
        if handle is None:
            raise LinkError("no proxy: the endpoint left the registry")
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), deadline)
        except TimeoutError as exc:
            raise LinkError(f"proxy gave no answer within {deadline:g} s") from exc
        except ActorDiedError as exc:
            # Its lifeline has seen the death too and is starting a new proxy.
            raise LinkError(f"proxy actor died mid-call ({_first_line(exc)})") from exc
        except RayError as exc:
            raise LinkError(f"proxy unavailable ({type(exc).__name__}: {_first_line(exc)})") from exc

    def close(self) -> None:
        self._node_refresh.cancel()
        for endpoint in list(self._handles):
            self.retire(endpoint)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
