"""What a driver script holds: :func:`attach` and :class:`Cluster` (the
coordinator's RPC client; :mod:`coordinator.driver.install` starts and
removes coordinators).

Every call validates its input with pydantic *before* anything is sent, and exists
twice: ``cluster.apply(...)`` blocks (for plain scripts), ``await
cluster.aio.apply(...)`` does not (for async code). Both are built from one
description of the call (:class:`_Call`), so they cannot drift apart.

Why this module is long: ``Cluster`` and ``cluster.aio`` are two faces of the
same calls, described once (:class:`_Call`) and written out per method so each
has its own signature and docstring for users; keeping both faces beside the
one description is what stops them drifting apart.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import ray
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, validate_call
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    RayError,
    RayTaskError,
)

from coordinator.core.config import CoordinatorConfig, EmbeddedSource, GatewaySettings
from coordinator.core.deployments import Decision, Deployment, DeploymentStatus, check_distinct
from coordinator.core.errors import (
    CoordinatorError,
    CoordinatorNotFoundError,
    CoordinatorUnavailableError,
)
from coordinator.core.models import (
    ApplyResult,
    ApplyType,
    ModelInstance,
    Name,
    SupportsOutcome,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
    WorkerSupportedModel,
    WorkerType,
)
from coordinator.core.placement import HEAD_NODE_RESOURCE, NodeInfo
from coordinator.core.rollout import ApplyOptions, ApplyPlan
from coordinator.core.naming import DEFAULT_NAME, DEFAULT_NAMESPACE, deployments_key, registry_actor, watcher_actor
from coordinator.core.status import ClusterStatus

log = logging.getLogger(__name__)

#: Seconds a driver allows beyond the operation's own deadline.
CALL_MARGIN = 30.0
#: Deadline of calls that only read the coordinator's state.
READ_TIMEOUT = 30.0
#: A driver's last-resort deadline for a rolling apply given no timeout.
ROLLOUT_BACKSTOP = 24 * 3600.0
def attach(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> Cluster:
    """A handle on a running coordinator."""
    if not ray.is_initialized():
        ray.init(namespace=namespace)
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise CoordinatorNotFoundError(name, namespace) from None
    return Cluster(name, namespace, handle)


@dataclass(frozen=True)
class _Call:
    """One coordinator call: the method, its arguments, how long to wait, whether
    it may be resent after the coordinator died (only reads), and how to shape
    the answer."""

    method: str
    args: tuple[Any, ...] = ()
    timeout: float = READ_TIMEOUT
    resendable: bool = True
    post: Callable[[Any], Any] = field(default=lambda x: x)


#: Seconds, as a caller may give them: positive and finite.
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Calls:
    """Builds :class:`_Call` s; shared by the sync and the async face. Every
    builder validates its arguments (``pydantic.validate_call``): a bad one
    raises ``ValidationError`` naming it, before anything is sent."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def _op_timeout(self, op: str, timeout: float | None) -> float:
        if timeout is not None:
            return timeout
        t = self._cluster.config.timeouts
        return t.for_operation(op) + 3 * t.connect + CALL_MARGIN

    @validate_call
    def instances(self, *, model: Name | None, worker_type: WorkerType | None, healthy_only: bool) -> _Call:
        return _Call("instances", (model, worker_type.value if worker_type else None, healthy_only))

    @validate_call
    def wait_for(self, *, model: Name, count: NonNegativeInt, worker_type: WorkerType, timeout: Seconds) -> _Call:
        return _Call("wait_for", (model, count, worker_type.value, timeout), timeout=timeout + READ_TIMEOUT)

    @validate_call
    def apply(
        self, *, model: Name, apply_type: ApplyType, worker_type: WorkerType, params: dict[str, Any] | None,
        timeout: Seconds | None, max_unavailable: PositiveInt | None = None, dry_run: bool = False,
        health_timeout: Seconds | None = None, drain_timeout: NonNegativeFloat | None = None,
    ) -> _Call:
        req = WorkerApplyRequest(
            model=model, apply_type=apply_type, worker_type=worker_type, params={} if params is None else params
        )
        options = ApplyOptions(
            apply_type=req.apply_type, max_unavailable=max_unavailable, dry_run=dry_run,
            health_timeout=health_timeout, timeout=None if dry_run else timeout, drain_timeout=drain_timeout,
        )
        if dry_run:
            return _Call("apply", (req, options))
        if timeout is None and max_unavailable is not None:
            # A rollout is bounded batch by batch in the coordinator (operation
            # deadline + health gate each); the driver only keeps a backstop.
            timeout = ROLLOUT_BACKSTOP
        return _Call("apply", (req, options), self._op_timeout("apply", timeout), resendable=False)

    @validate_call
    def lifecycle(
        self, *, op: Literal["startup", "shutdown"], req: WorkerStartupRequest, timeout: Seconds | None,
        drain_timeout: NonNegativeFloat | None = None,
    ) -> _Call:
        args = (req, timeout) if drain_timeout is None else (req, timeout, drain_timeout)
        return _Call(op, args, self._op_timeout(op, timeout), resendable=False)

    @validate_call
    def supports(self, *, timeout: Seconds | None) -> _Call:
        return _Call("supports", (), self._op_timeout("supports", timeout))

    @validate_call
    def supported_models(self, *, timeout: Seconds | None) -> _Call:
        return _Call("supports", (), self._op_timeout("supports", timeout), post=_merge_supports)

    def status(self) -> _Call:
        return _Call("status")

    @validate_call
    def deploy(self, *, deployments: list[Deployment], wait: bool, timeout: Seconds | None) -> _Call:
        check_distinct(deployments)
        limit = (timeout or self._cluster.config.timeouts.startup) + READ_TIMEOUT if wait else READ_TIMEOUT
        # Resendable: a deploy is idempotent (the same spec keeps its generation).
        return _Call("deploy", (deployments, wait, timeout), limit)

    @validate_call
    def undeploy(self, *, model: Name, worker_type: WorkerType, shutdown: bool) -> _Call:
        key = f"{model}@{worker_type.value}"
        limit = self._op_timeout("shutdown", None) if shutdown else READ_TIMEOUT
        return _Call("undeploy", (key, shutdown), limit, resendable=not shutdown)

    def deployments(self) -> _Call:
        return _Call("deployments")

    def page_url(self) -> _Call:
        return _Call("page_url")

    @validate_call
    def plan(self, *, deployments: list[Deployment]) -> _Call:
        check_distinct(deployments)
        return _Call("plan_deploy", (deployments,))


def _merge_supports(outcomes: list[SupportsOutcome]) -> list[WorkerSupportedModel]:
    merged = []
    for outcome in outcomes:
        if outcome.error:
            log.warning("%s", outcome.error)
        merged.extend(outcome.models)
    return merged


def _translate(exc: BaseException, call: _Call) -> BaseException:
    """Ray's exceptions about the coordinator, as ours."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, CoordinatorError):
            return cause
        return CoordinatorError(f"coordinator failed in {call.method}: {type(cause).__name__}: {cause}")
    maybe = "" if call.resendable else "; the operation may or may not have been carried out"
    if isinstance(exc, (GetTimeoutError, TimeoutError)):
        going = "" if call.resendable else (
            "; the operation may or may not have been carried out: it keeps its model's turn until its "
            "worker calls end, and those end by its deadline")
        return CoordinatorUnavailableError(f"no answer to {call.method} within {call.timeout:g} s{going}")
    if isinstance(exc, (ActorDiedError, ActorUnavailableError)):
        return CoordinatorUnavailableError(f"coordinator unavailable during {call.method}{maybe}: {exc}")
    return exc


def _retry_after(exc: BaseException, ref: Any, call: _Call, attempt: int, deadline: float, cluster: Cluster) -> float | None:
    """After a failed call: seconds to wait before sending it again, or None to
    give up. A read that timed out is cancelled; an operation is not — it owns
    its model's turn until its worker calls end, which its deadline bounds. Only
    reads are resent — while the coordinator restarts, or once after it was
    replaced — and only within the call's deadline."""
    if isinstance(exc, (GetTimeoutError, TimeoutError)):
        if call.resendable:
            ray.cancel(ref)
        return None
    if not call.resendable or time.monotonic() >= deadline:
        return None
    if isinstance(exc, ActorUnavailableError):
        return min(1.0, 0.1 * attempt)
    if isinstance(exc, ActorDiedError) and attempt <= 3 and cluster._reresolve():
        return 0.0
    return None


_F = TypeVar("_F", bound=Callable[..., Any])


def _refuse_in_loop(what: str, twin: str) -> None:
    """A blocking call made inside a running event loop would stall it: refuse
    it, naming the coroutine to await instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{what} blocks; in async code use '{twin}'")


def _blocks(method: _F) -> _F:
    """A public blocking call of :class:`Cluster`: refused inside a running
    event loop, naming its twin on ``cluster.aio``."""
    name = method.__name__

    @functools.wraps(method)
    def guarded(self: Cluster, *args: Any, **kwargs: Any) -> Any:
        _refuse_in_loop(f"Cluster.{name}()", f"await cluster.aio.{name}(...)")
        return method(self, *args, **kwargs)

    return guarded  # type: ignore[return-value]


class Cluster:
    """A handle on a running coordinator. Blocking calls; ``cluster.aio`` has the
    same calls as coroutines. Every call works as the first one on a fresh
    handle, from plain code and from any thread; inside a running event loop
    the blocking ones refuse (naming their coroutine twin) instead of stalling it."""

    def __init__(self, name: str, namespace: str, handle: Any, owned: list[Any] | None = None) -> None:
        self.name, self.namespace = name, namespace
        self._handle = handle
        self._owned = owned or []
        self._config: CoordinatorConfig | None = None
        self._calls = _Calls(self)
        self.aio = AsyncCluster(self)

    def __repr__(self) -> str:
        return f"Cluster(name={self.name!r}, namespace={self.namespace!r})"

    @property
    def config(self) -> CoordinatorConfig:
        if self._config is None:
            _refuse_in_loop("Cluster.config", "await cluster.aio.config()")
            self._config = self._run(_Call("get_config"))
        return self._config

    # -- the calls --

    @_blocks
    def instances(
        self, model: str | None = None, worker_type: str | None = None, healthy_only: bool = True
    ) -> list[ModelInstance]:
        return self._run(self._calls.instances(model=model, worker_type=worker_type, healthy_only=healthy_only))

    @_blocks
    def wait_for(self, model: str, count: int = 1, worker_type: str = "llm", timeout: float = 60.0) -> list[ModelInstance]:
        return self._run(self._calls.wait_for(model=model, count=count, worker_type=worker_type, timeout=timeout))

    @_blocks
    def apply(
        self, model: str, apply_type: ApplyType | str, worker_type: WorkerType | str = "llm",
        params: dict[str, Any] | None = None, timeout: float | None = None, *,
        max_unavailable: int | None = None, dry_run: bool = False, health_timeout: float | None = None,
        drain_timeout: float | None = None,
    ) -> ApplyResult | ApplyPlan:
        """Apply to every registered instance of ``model@worker_type``.

        ``max_unavailable=k`` rolls a restart/update_params through batches of at
        most k, waiting after each until its instances are healthy again (up to
        ``health_timeout``) and stopping at the first failed batch; the rest are
        reported as not attempted. ``dry_run=True`` returns the plan
        (:class:`ApplyPlan`) and sends nothing. A stop, restart or
        update_params drains each instance first, for at most
        ``drain_timeout`` seconds (default: the config's ``drain.timeout``; 0:
        no drain): see README, "Changing a live fleet".
        """
        return self._run(self._calls.apply(
            model=model, apply_type=apply_type, worker_type=worker_type, params=params, timeout=timeout,
            max_unavailable=max_unavailable, dry_run=dry_run, health_timeout=health_timeout,
            drain_timeout=drain_timeout))

    @_blocks
    def startup(self, req: WorkerStartupRequest | dict[str, Any], timeout: float | None = None) -> WorkerApplyOutput:
        return self._run(self._calls.lifecycle(op="startup", req=req, timeout=timeout))

    @_blocks
    def shutdown(self, req: WorkerStartupRequest | dict[str, Any], timeout: float | None = None,
                 drain_timeout: float | None = None) -> WorkerApplyOutput:
        """Stop ``req.model`` on one worker manager, drained first for at most
        ``drain_timeout`` s (default: the config's ``drain.timeout``; 0: none)."""
        return self._run(self._calls.lifecycle(op="shutdown", req=req, timeout=timeout,
                                               drain_timeout=drain_timeout))

    @_blocks
    def supported_models(self, timeout: float | None = None) -> list[WorkerSupportedModel]:
        return self._run(self._calls.supported_models(timeout=timeout))

    @_blocks
    def supports(self, timeout: float | None = None) -> list[SupportsOutcome]:
        """Per worker manager: its models, or why it could not say."""
        return self._run(self._calls.supports(timeout=timeout))

    @_blocks
    def status(self) -> ClusterStatus:
        return self._run(self._calls.status())

    @_blocks
    def deploy(self, *deployments: Deployment | dict[str, Any], wait: bool = False,
               timeout: float | None = None) -> list[int]:
        """Create or replace the desired state of each deployment's
        ``model@worker_type``; the generation of each. The coordinator keeps it
        from then on (see README, "Keeping a fleet in shape"). With
        ``wait=True``, blocks until each is ready, or raises
        :class:`DeploymentNotReadyError` naming its state and why."""
        return self._run(self._calls.deploy(deployments=list(deployments), wait=wait, timeout=timeout))

    @_blocks
    def undeploy(self, model: str, worker_type: str = "llm", shutdown: bool = False) -> DeploymentStatus:
        """Stop keeping ``model@worker_type``; its instances keep running unless
        ``shutdown=True``, which stops them first. Its last status."""
        return self._run(self._calls.undeploy(model=model, worker_type=worker_type, shutdown=shutdown))

    @_blocks
    def deployments(self) -> list[DeploymentStatus]:
        return self._run(self._calls.deployments())

    @_blocks
    def plan(self, *deployments: Deployment | dict[str, Any]) -> list[tuple[str, Decision]]:
        """What deploying these would do now (``coordinator deploy --dry-run``); nothing is sent or kept."""
        return self._run(self._calls.plan(deployments=list(deployments)))

    @_blocks
    def fleet_page_url(self) -> str | None:
        """Where the fleet page serves (README, "The fleet page"): open it in a
        browser. None when the config turns it off (``page: {enabled: false}``)."""
        return self._run(self._calls.page_url())

    @_blocks
    def registry_url(self, source: str | None = None) -> str:
        """The controller URL of an embedded registry (the first one by default):
        what DB-GPT workers take as ``controller_addr``."""
        actor = self._registry_actor(self.config, source)
        return ray.get(actor.ready.remote(), timeout=READ_TIMEOUT)

    def _registry_actor(self, config: CoordinatorConfig, source: str | None) -> Any:
        embedded = [s for s in config.registries if isinstance(s, EmbeddedSource)]
        chosen = [s for s in embedded if source in (None, s.name)]
        if not chosen:
            raise CoordinatorError(f"no embedded registry source named {source!r} in this config")
        try:
            return ray.get_actor(registry_actor(self.name, chosen[0].name), namespace=self.namespace)
        except ValueError:
            raise CoordinatorUnavailableError(
                f"the embedded registry {chosen[0].name!r} of coordinator {self.name!r} is not running") from None

    @_blocks
    def serve(self, port: int = 8100, host: str = "127.0.0.1", replicas: int = 1,
              settings: GatewaySettings | dict[str, Any] | None = None) -> str:
        """Start the OpenAI-compatible gateway (or find it running); its base
        URL. ``settings`` (the config's ``gateway:`` section: API keys, TLS,
        limits) override ``port``/``host``/``replicas`` when given."""
        from coordinator.driver.install import serve

        chosen = GatewaySettings.model_validate(
            settings if settings is not None else {"port": port, "host": host, "replicas": replicas})
        return serve(self, chosen)

    @_blocks
    def stop(self, forget: bool = False) -> None:
        """Remove the coordinator, its watchers and its embedded registries —
        also when the coordinator no longer answers. The deployments stay kept
        in the GCS: a later :func:`start` of the same name and namespace takes
        them up again. ``forget=True`` deletes them too."""
        # The installer removes what it created (it imports this module for
        # Cluster, hence the import here).
        from coordinator.driver.install import remove

        remove(self.name, self.namespace, self._handle, forget)

    # -- running a call, blocking --

    def _run(self, call: _Call) -> Any:
        # Public calls refuse earlier, by their own name; this catches a
        # blocking path taken by mistake from a coroutine.
        _refuse_in_loop(f"the coordinator call {call.method!r}", "the coroutine on cluster.aio")
        deadline = time.monotonic() + call.timeout
        for attempt in itertools.count(1):
            ref = getattr(self._handle, call.method).remote(*call.args)
            try:
                return call.post(ray.get(ref, timeout=max(0.1, deadline - time.monotonic())))
            except (RayError, TimeoutError) as exc:
                wait = _retry_after(exc, ref, call, attempt, deadline, self)
                if wait is None:
                    raise _translate(exc, call) from None
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _reresolve(self) -> bool:
        """Look the named actor up again (it may have been replaced)."""
        try:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        except ValueError:
            return False
        return True


class AsyncCluster:
    """``cluster.aio``: the calls of :class:`Cluster`, as coroutines."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._calls = cluster._calls

    async def config(self) -> CoordinatorConfig:
        if self._cluster._config is None:
            self._cluster._config = await self._run(_Call("get_config"))
        return self._cluster._config

    async def instances(
        self, model: str | None = None, worker_type: str | None = None, healthy_only: bool = True
    ) -> list[ModelInstance]:
        return await self._run(self._calls.instances(model=model, worker_type=worker_type, healthy_only=healthy_only))

    async def wait_for(self, model: str, count: int = 1, worker_type: str = "llm", timeout: float = 60.0) -> list[ModelInstance]:
        return await self._run(self._calls.wait_for(model=model, count=count, worker_type=worker_type, timeout=timeout))

    async def apply(
        self, model: str, apply_type: ApplyType | str, worker_type: WorkerType | str = "llm",
        params: dict[str, Any] | None = None, timeout: float | None = None, *,
        max_unavailable: int | None = None, dry_run: bool = False, health_timeout: float | None = None,
        drain_timeout: float | None = None,
    ) -> ApplyResult | ApplyPlan:
        await self.config()
        return await self._run(self._calls.apply(
            model=model, apply_type=apply_type, worker_type=worker_type, params=params, timeout=timeout,
            max_unavailable=max_unavailable, dry_run=dry_run, health_timeout=health_timeout,
            drain_timeout=drain_timeout))

    async def startup(self, req: WorkerStartupRequest | dict[str, Any], timeout: float | None = None) -> WorkerApplyOutput:
        await self.config()
        return await self._run(self._calls.lifecycle(op="startup", req=req, timeout=timeout))

    async def shutdown(self, req: WorkerStartupRequest | dict[str, Any], timeout: float | None = None,
                       drain_timeout: float | None = None) -> WorkerApplyOutput:
        await self.config()
        return await self._run(self._calls.lifecycle(op="shutdown", req=req, timeout=timeout,
                                                     drain_timeout=drain_timeout))

    async def supported_models(self, timeout: float | None = None) -> list[WorkerSupportedModel]:
        await self.config()
        return await self._run(self._calls.supported_models(timeout=timeout))

    async def supports(self, timeout: float | None = None) -> list[SupportsOutcome]:
        await self.config()
        return await self._run(self._calls.supports(timeout=timeout))

    async def status(self) -> ClusterStatus:
        return await self._run(self._calls.status())

    async def deploy(self, *deployments: Deployment | dict[str, Any], wait: bool = False,
                     timeout: float | None = None) -> list[int]:
        await self.config()
        return await self._run(self._calls.deploy(deployments=list(deployments), wait=wait, timeout=timeout))

    async def undeploy(self, model: str, worker_type: str = "llm", shutdown: bool = False) -> DeploymentStatus:
        await self.config()
        return await self._run(self._calls.undeploy(model=model, worker_type=worker_type, shutdown=shutdown))

    async def deployments(self) -> list[DeploymentStatus]:
        return await self._run(self._calls.deployments())

    async def plan(self, *deployments: Deployment | dict[str, Any]) -> list[tuple[str, Decision]]:
        return await self._run(self._calls.plan(deployments=list(deployments)))

    async def serve(self, port: int = 8100, host: str = "127.0.0.1", replicas: int = 1,
                    settings: GatewaySettings | dict[str, Any] | None = None) -> str:
        """See :meth:`Cluster.serve`."""
        return await asyncio.to_thread(self._cluster.serve, port, host, replicas, settings)

    async def fleet_page_url(self) -> str | None:
        """See :meth:`Cluster.fleet_page_url`."""
        return await self._run(self._calls.page_url())

    async def registry_url(self, source: str | None = None) -> str:
        """The controller URL of an embedded registry (the first one by default)."""
        config = await self.config()
        # Looking a named actor up asks the GCS, blocking: off the loop.
        actor = await asyncio.to_thread(self._cluster._registry_actor, config, source)
        try:
            return await asyncio.wait_for(actor.ready.remote(), READ_TIMEOUT)
        except TimeoutError:
            raise CoordinatorUnavailableError(
                f"the embedded registry did not answer within {READ_TIMEOUT:g} s") from None

    async def stop(self, forget: bool = False) -> None:
        """Remove the coordinator, its watchers and its embedded registries
        (see :meth:`Cluster.stop`); ``forget=True`` deletes the kept deployments."""
        await asyncio.to_thread(self._cluster.stop, forget)

    async def _run(self, call: _Call) -> Any:
        deadline = time.monotonic() + call.timeout
        for attempt in itertools.count(1):
            ref = getattr(self._cluster._handle, call.method).remote(*call.args)
            try:
                return call.post(await asyncio.wait_for(ref, max(0.1, deadline - time.monotonic())))
            except (RayError, TimeoutError) as exc:
                wait = _retry_after(exc, ref, call, attempt, deadline, self._cluster)
                if wait is None:
                    raise _translate(exc, call) from None
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")
