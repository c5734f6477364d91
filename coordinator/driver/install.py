"""Installing and removing a coordinator on a Ray cluster: :func:`start`
creates its embedded registries, watchers and the coordinator actor (and
removes what it created if any part fails); :func:`stop` / :func:`remove`
take them all down again, also when the coordinator no longer answers."""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from coordinator.core.config import CoordinatorConfig, EmbeddedSource
from coordinator.core.errors import AlreadyRunningError, CoordinatorError
from coordinator.core.config import GatewaySettings
from coordinator.core.naming import (
    DEFAULT_NAME,
    DEFAULT_NAMESPACE,
    deployments_key,
    gateway_actor,
    registry_actor,
    watcher_actor,
)
from coordinator.core.placement import HEAD_NODE_RESOURCE, NodeInfo
from coordinator.driver.client import READ_TIMEOUT, Cluster

log = logging.getLogger(__name__)

#: Seconds ``stop`` gives the coordinator, and then its watchers and
#: registries together, to close before killing them anyway.
STOP_ANSWER = 10.0
#: Calls the coordinator actor runs at once. Most of them are parked long polls
#: — one route-table follower per caller process, one per ``deploy(wait=True)``
#: and ``wait_for`` — that cost a coroutine each, not a thread; Ray's default of
#: 1,000 for an async actor would let a large fleet of callers queue every
#: other call (status, apply) behind them. Ray Serve's controller uses the same.
COORDINATOR_MAX_CONCURRENCY = 15_000


def _options(name: str, namespace: str, detached: bool, on_head: bool,
             max_concurrency: int | None = None) -> dict[str, Any]:
    options = {
        "name": name,
        "namespace": namespace,
        "lifetime": "detached" if detached else None,
        "max_restarts": -1,
        "num_cpus": 0,
        "get_if_exists": True,
        # A sliver of the head's marker resource pins the actor (and its restarts)
        # to the head node without taking anything from it.
        "resources": {HEAD_NODE_RESOURCE: 0.001} if on_head else {},
    }
    if max_concurrency is not None:
        options["max_concurrency"] = max_concurrency
    return options


def start(
    config: CoordinatorConfig | dict[str, Any],
    name: str = DEFAULT_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    detached: bool = False,
    ready_timeout: float = 60.0,
    advice: str = "attach() to it as it is, or stop it first",
) -> Cluster:
    """Start the coordinator, its watchers and any embedded registries on the
    connected Ray cluster (``ray.init()`` is called when Ray is not initialised),
    or return the running one with that name.

    With ``detached=True`` the actors outlive this driver. If any part fails to
    start, the parts this call created are removed again. A coordinator of that
    name running with another config raises :class:`AlreadyRunningError`,
    ending with ``advice`` (what the caller can do: the command line says its
    own commands).
    """
    # Imported here, not at the top: the actor modules import this package, and a
    # Ray worker process that loads one of them first must not come back here.
    from actors.registry import EmbeddedRegistry
    from actors.watcher import RegistryWatcher
    from coordinator.control.actor import CoordinatorActor

    config = CoordinatorConfig.model_validate(config)
    if not ray.is_initialized():
        ray.init(namespace=namespace)
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        handle = None
    if handle is not None:
        running = ray.get(handle.get_config.remote(), timeout=READ_TIMEOUT)
        if running != config:
            differs = [f for f in CoordinatorConfig.model_fields if getattr(running, f) != getattr(config, f)]
            raise AlreadyRunningError(name, differs, advice)
        return Cluster(name, namespace, handle)

    on_head = config.placement.on_head
    created: list[Any] = []
    try:
        registries = []
        for source in config.registries:
            if isinstance(source, EmbeddedSource):
                reg = ray.remote(EmbeddedRegistry).options(
                    **_options(registry_actor(name, source.name), namespace, detached, on_head)
                ).remote(source, state=registry_actor(name, source.name), exit_on_fatal=True, export_metrics=True)
                created.append(reg)
                registries.append((source, reg))
        for source, reg in registries:
            try:
                ray.get(reg.ready.remote(), timeout=ready_timeout)
            except RayTaskError as exc:
                raise CoordinatorError(
                    f"embedded registry {source.name!r} could not serve on "
                    f"{source.host}:{source.port}: {exc.cause}"
                ) from None
        watchers = []
        for source in config.registries:
            watchers.append(
                ray.remote(RegistryWatcher).options(
                    **_options(watcher_actor(name, source.name), namespace, detached, on_head)
                ).remote(
                    source,
                    config.backoff,
                    registry_actor=registry_actor(name, source.name),
                    namespace=namespace,
                    long_poll=config.long_poll_timeout,
                    pace=config.change_pace,
                    export_metrics=True,
                    exit_on_fatal=True,
                )
            )
        created += watchers
        nodes = [NodeInfo.from_ray(n) for n in ray.nodes()]
        handle = ray.remote(CoordinatorActor).options(
            **_options(name, namespace, detached, on_head, COORDINATOR_MAX_CONCURRENCY)).remote(
            config, name, namespace, nodes
        )
        created.append(handle)
        # Each watcher's first fetch, well or badly: a source that is down is
        # said at once (and followed from then on), not waited out.
        firsts = ray.get([w.ready.remote(ready_timeout) for w in watchers], timeout=ready_timeout + READ_TIMEOUT)
        down = [st for st in firsts if not st.ready]
        for st in down:
            log.warning("coordinator %r: source %r (%s) did not answer: %s; following it until it does",
                        name, st.source, st.target, st.last_error or "no answer yet")
        wait = min(5.0, ready_timeout) if down else ready_timeout
        if not ray.get(handle.ready.remote(wait), timeout=wait + READ_TIMEOUT) and not down:
            log.warning("coordinator %r started, but not every watcher answered within %ss", name, ready_timeout)
    except BaseException:
        for actor in created:
            ray.kill(actor, no_restart=True)
        raise
    # A named actor that is not detached lives while its creator holds a handle:
    # the Cluster keeps them.
    cluster = Cluster(name, namespace, handle, owned=created)
    if config.gateway is not None:
        serve(cluster, config.gateway, detached=detached, ready_timeout=ready_timeout)
    return cluster


def serve(cluster: Cluster, settings: GatewaySettings, detached: bool | None = None,
          ready_timeout: float = 60.0) -> str:
    """Start the gateway of ``cluster``'s coordinator (``settings.replicas``
    actors, spread over the Ray nodes, sharing the port), or return the
    running one's URL. Its actors belong to the coordinator: named after it,
    restarted by Ray, removed by its ``stop``; detached when the coordinator
    is (by default: when this driver did not start it itself)."""
    from coordinator.driver.gateway import Gateway

    if detached is None:
        detached = not cluster._owned
    on_head = False
    urls, created = [], []
    try:
        for replica in range(settings.replicas):
            actor_name = gateway_actor(cluster.name, replica)
            try:
                handle = ray.get_actor(actor_name, namespace=cluster.namespace)
                running = ray.get(handle.get_settings.remote(), timeout=READ_TIMEOUT)
                if running != settings:
                    raise CoordinatorError(
                        f"the gateway of coordinator {cluster.name!r} already serves with other settings "
                        f"({running.host}:{running.port}, {running.replicas} replicas): stop the coordinator "
                        "to change them")
            except ValueError:
                options = _options(actor_name, cluster.namespace, detached, on_head)
                options["scheduling_strategy"] = "SPREAD"
                if settings.node_resource is not None:  # one replica per node that has a unit
                    options["resources"] = {settings.node_resource: 1}
                handle = ray.remote(Gateway).options(**options).remote(
                    cluster.name, cluster.namespace, settings, replica)
                created.append(handle)
            urls.append(ray.get(handle.ready.remote(), timeout=ready_timeout))
    except RayTaskError as exc:
        for actor in created:
            ray.kill(actor, no_restart=True)
        raise CoordinatorError(f"the gateway could not serve on {settings.host}:{settings.port}: {exc.cause}") \
            from None
    except BaseException:
        for actor in created:
            ray.kill(actor, no_restart=True)
        raise
    if not detached:
        cluster._owned.extend(created)  # held while the driver holds the Cluster
    return urls[0]


def stop(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE, forget: bool = False) -> list[str]:
    """Remove whatever is left of the coordinator ``name``: the coordinator
    (answering, hung or already gone), its watchers and its embedded
    registries; with ``forget=True`` its kept deployments too. The names of
    the actors removed."""
    if not ray.is_initialized():
        ray.init(namespace=namespace)
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        handle = None
    return remove(name, namespace, handle, forget)


def _parts(name: str, namespace: str) -> list[str]:
    """The named actors of coordinator ``name`` that are still registered:
    its watchers and embedded registries (coordinator/core/naming.py)."""
    prefixes = (watcher_actor(name, ""), registry_actor(name, ""), gateway_actor(name, ""))
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace and a["name"].startswith(prefixes))


def _kv_delete(key: str, prefix: bool = False) -> None:
    from actors.registry_state import GcsStateStore
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, del_by_prefix=prefix, namespace=GcsStateStore.NAMESPACE)


def remove(name: str, namespace: str, handle: Any | None, forget: bool) -> list[str]:
    """Each step is bounded and none depends on an answer: the coordinator is
    asked to close, then killed whether it answered or not (its proxies are
    its own, not detached, actors: they die with it); its watchers and
    registries, found by name, are asked to close (a registry also forgets its
    saved entries), then killed; with ``forget`` the kept deployments are
    deleted here too, in case the coordinator could not do it itself."""
    removed = []
    if handle is not None:
        try:
            ray.get(handle.close.remote(forget), timeout=STOP_ANSWER)
        except (RayError, TimeoutError) as exc:
            log.warning("coordinator %r did not close within %ss (%s); killing it", name, STOP_ANSWER,
                        type(exc).__name__)
        ray.kill(handle, no_restart=True)
        removed.append(name)
    parts = {}
    for actor_name in _parts(name, namespace):
        try:
            parts[actor_name] = ray.get_actor(actor_name, namespace=namespace)
        except ValueError:  # gone meanwhile
            continue
    is_registry = {n: n.startswith(registry_actor(name, "")) for n in parts}
    # A registry removed on purpose also forgets its saved state; a watcher just closes.
    asked = {n: getattr(a, "forget" if is_registry[n] else "close").remote() for n, a in parts.items()}
    done, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=STOP_ANSWER) if asked else ([], [])
    for actor_name, actor in parts.items():
        answered = asked[actor_name] in done
        if answered:
            try:
                ray.get(asked[actor_name])
            except RayError:
                answered = False
        if not answered:
            log.warning("%r did not close cleanly within %ss; killed", actor_name, STOP_ANSWER)
        ray.kill(actor, no_restart=True)
        removed.append(actor_name)
        if is_registry[actor_name] and not answered:
            # What Journal.forget deletes: the registry's key (its state's
            # name is its actor's name) and everything under it.
            _kv_delete(actor_name)
            _kv_delete(f"{actor_name}/", prefix=True)
    if forget:
        _kv_delete(deployments_key(name, namespace))
    return removed
