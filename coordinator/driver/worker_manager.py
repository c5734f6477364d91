"""``RayWorkerManager``: DB-GPT's worker-manager interface over a
:class:`~coordinator.driver.client.Cluster`, so DB-GPT-style code — and DB-GPT's own
servers, which use a worker manager mostly for inference — can switch by
changing one constructor.

Control (``worker_apply``, ``model_startup``, ``model_shutdown``,
``supported_models``, instance getters) goes through the coordinator.
Inference (``generate_stream``, ``generate``, ``embeddings``,
``sync_embeddings``, ``count_token``, ``get_model_metadata``,
``select_one_instance``, ``sync_select_one_instance``,
``parameter_descriptions``) goes from this process straight to a worker, chosen
locally from the coordinator's route table (:mod:`coordinator.driver.router`): only
instances listed healthy, enabled and found reachable by the probes; power of
two choices on requests in flight, honouring ``weight``, among the instances
below ``caller.max_connections_per_worker`` requests in flight from this
process. A request that never reached a worker goes to another instance, at
most twice; one that may have reached it is never resent — a broken stream
ends with an error output naming the worker and the cause. When every instance
is at the limit, the request fails at once, naming it.

With ``caller.flow`` in the coordinator's config, ``generate``,
``generate_stream``, ``embeddings`` and the routed calls that carry them first
wait for a place under flow control (:mod:`coordinator.driver.flow_gate`): one
gate per process and coordinator, shared by every manager and thread, with a
capacity per model, a bounded queue with a deadline, strict priorities, and
fair shares between the tenants the managers are made for
(``RayWorkerManager(cluster, tenant="batch", priority=1)``). A call that cannot
wait raises :class:`OverloadedError` (``generate`` answers it as an error
output). Its waiting requests are reported as queued for their model: demand
the autoscaler sees. The gateway's manager is made with ``flow=False``: the
gateway gates its requests itself (``gateway.flow``).

Every method works as the first call on a fresh :func:`~coordinator.attach`,
from plain code, from a coroutine and from any thread (the ``sync_*`` ones
too; they block their caller, so in async code await their twins). The route
table is followed once per process and coordinator, however many managers
there are (see :mod:`coordinator.driver.router`); ``in_flight()`` counts the whole
process's requests.

Differences that are on purpose: ``worker_apply`` combines *every* instance's
output (DB-GPT returns only the first); the instance getters and
``select_one_instance`` return ``ModelInstance`` (DB-GPT's ``WorkerRunData`` is
its in-process bookkeeping); failures name the worker.

Why this module is long: it is DB-GPT's whole ``WorkerManager`` interface —
a dozen methods callers expect by name, each a few lines — over the routed
calls that carry them, which the gateway uses too.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from contextlib import aclosing, asynccontextmanager
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from coordinator.driver.client import Cluster
from coordinator.core.config import FlowSettings
from coordinator.core.errors import CoordinatorError, NoInstancesError
from coordinator.core.flow import FlowRequest, tokens_of, tokens_spent
from coordinator.core.inference import ModelMetadata, ModelOutput, ParameterDescription, Route
from coordinator.core.models import (
    ModelInstance,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
    WorkerSupportedModel,
    worker_key,
)
from coordinator.core.routing import prompt_text
from coordinator.driver.caller import MaybeReceived, NeverSent, WorkerCaller
from coordinator.driver.flow_gate import FlowGate, FlowRefused, refusal_message
from coordinator.driver.router import MAX_SENDS, Router

T = TypeVar("T")

#: Seconds a worker may take to send the next bytes of an answer.
READ_TIMEOUT = 600.0
#: Seconds the first inference call waits for the route table.
ROUTES_WAIT = 30.0
#: Seconds between looks for kept-open connections to workers that left the table.
PRUNE_EVERY = 10.0
#: The tenant of a manager made without one (under ``caller.flow``).
DEFAULT_TENANT = "default"
#: The routed paths flow control gates (inference; not metadata or token counts).
GATED_PATHS = ("/generate", "/embeddings")


class WorkerOperationError(CoordinatorError):
    """A startup/shutdown the worker did not carry out; DB-GPT raises here too."""

    def __init__(self, output: WorkerApplyOutput) -> None:
        super().__init__(output.message)
        self.output, self._args = output, (output,)


class Routed:
    """Where a routed request went, and why (filled as it is sent)."""

    def __init__(self) -> None:
        self.route: Route | None = None
        self.reason: str | None = None  # the routing policy's reason for the last instance tried
        self.reasons: list[str] = []  # for every instance tried, in order

    def went(self, route: Route, reasons: list[str]) -> None:
        self.route, self.reason, self.reasons = route, reasons[-1], reasons


class InferenceError(CoordinatorError):
    """An embeddings, count_token, metadata or descriptions call that failed,
    naming the worker and the cause (DB-GPT raises on these too; generate and
    generate_stream never raise: they answer a ModelOutput with the error).

    Its kinds, for callers that answer each differently (the gateway)::

        InferenceError
        ├── NoInstanceError    nothing to send to: none listed healthy, enabled
        │                      and reachable, or every one at its connection limit (busy)
        ├── OverloadedError    flow control (caller.flow) would not run it: its
        │                      queue full, its tenant's limit, or a wait too long
        ├── NotReachedError    every instance tried provably never got the request
        └── WorkerFailedError  a worker that may have received it failed (never resent)
    """


class NoInstanceError(InferenceError):
    def __init__(self, message: str, busy: bool = False, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.busy = busy
        #: Seconds to wait before trying again, when there is reason to think
        #: an instance is coming (a model scaling from zero).
        self.retry_after = retry_after


class OverloadedError(InferenceError):
    """Flow control (``caller.flow``) would not run the request: ``reason``
    is ``queue_full``, ``displaced``, ``deadline`` or ``tenant_limit``."""

    def __init__(self, message: str, reason: str, tenant: str, retry_after: int) -> None:
        super().__init__(message)
        self.reason, self.tenant = reason, tenant
        #: Seconds to wait before trying again (``caller.flow.retry_after``).
        self.retry_after = retry_after


class NotReachedError(InferenceError):
    pass


class WorkerFailedError(InferenceError):
    def __init__(self, message: str, worker: str) -> None:
        super().__init__(message)
        self.worker = worker


class RayWorkerManager:
    """DB-GPT's worker manager over ``cluster``. Under ``caller.flow`` its
    inference calls are ``tenant``'s, at ``priority`` (default: the tenant's
    own in ``caller.flow``); ``flow=False`` sends them ungated (the gateway's
    manager: the gateway gates them itself)."""

    def __init__(self, cluster: Cluster, read_timeout: float = READ_TIMEOUT, rng: random.Random | None = None,
                 *, tenant: str = DEFAULT_TENANT, priority: int | None = None, flow: bool = True) -> None:
        if not tenant:
            raise ValueError("a tenant must have a name")
        if priority is not None and priority < 0:
            raise ValueError(f"a priority must be >= 0, not {priority}")
        self.cluster = cluster
        self.tenant, self.priority = tenant, priority
        self._gated = flow
        self._flow: FlowSettings | None = None
        self._rng = rng
        self._read_timeout = read_timeout
        self._lease: Router | None = None
        self._release: weakref.finalize | None = None
        self._caller: WorkerCaller | None = None
        self._pruned: tuple[int, float] = (-1, 0.0)  # (route-table updates, monotonic time) at the last prune
        self._sync_loop: asyncio.AbstractEventLoop | None = None
        self._sync_lock = threading.Lock()

    # ---- control, through the coordinator -------------------------------

    async def supported_models(self) -> list[WorkerSupportedModel]:
        return await self.cluster.aio.supported_models()

    async def model_startup(self, startup_req: WorkerStartupRequest) -> None:
        output = await self.cluster.aio.startup(startup_req)
        if not output.success:
            raise WorkerOperationError(output)

    async def model_shutdown(self, shutdown_req: WorkerStartupRequest) -> None:
        output = await self.cluster.aio.shutdown(shutdown_req)
        if not output.success:
            raise WorkerOperationError(output)

    async def worker_apply(self, apply_req: WorkerApplyRequest) -> WorkerApplyOutput:
        req = WorkerApplyRequest.model_validate(apply_req)
        result = await self.cluster.aio.apply(req.model, req.apply_type, req.worker_type, req.params)
        return result.output

    async def get_model_instances(
        self, worker_type: str, model_name: str, healthy_only: bool = True
    ) -> list[ModelInstance]:
        return await self.cluster.aio.instances(model_name, worker_type, healthy_only)

    async def get_all_model_instances(self, worker_type: str, healthy_only: bool = True) -> list[ModelInstance]:
        return await self.cluster.aio.instances(None, worker_type, healthy_only)

    def sync_get_model_instances(
        self, worker_type: str, model_name: str, healthy_only: bool = True
    ) -> list[ModelInstance]:
        return self._blocking(self.get_model_instances(worker_type, model_name, healthy_only))

    # ---- inference, straight to a worker ----------------------------------

    async def generate_stream(self, params: dict[str, Any], **_: Any) -> AsyncIterator[ModelOutput]:
        """The model's output as it streams (each chunk as the worker sends it).
        Never raises: no instance, or a stream that broke, ends with a
        ModelOutput whose ``error_code`` is 1 and whose text says why."""
        if not params.get("model"):
            yield ModelOutput.error("Model name count not be empty")
            return
        try:
            # Closed with this generator (a caller that stops reading ends the
            # worker call and its count in flight at once, not at collection).
            async with aclosing(self.routed_stream(params)) as outputs:
                async for output in outputs:
                    yield output
        except InferenceError as exc:
            yield ModelOutput.error(str(exc))

    async def generate(self, params: dict[str, Any]) -> ModelOutput:
        """The model's whole answer. Never raises (see :meth:`generate_stream`)."""
        key = _key(params, "llm")
        if key is None:
            return ModelOutput.error("Model name count not be empty")
        try:
            return ModelOutput.model_validate(await self._call(key, "POST", "/generate", json=params))
        except InferenceError as exc:
            return ModelOutput.error(str(exc))

    async def routed_stream(self, params: dict[str, Any], worker_type: str = "llm", route: Routed | None = None,
                            headers: dict[str, str] | None = None) -> AsyncIterator[ModelOutput]:
        """``generate_stream`` for callers that tell failures apart (the
        gateway): raises :class:`NoInstanceError` (nothing to send to: none
        listed, or all at their connection limit — ``busy``),
        :class:`NotReachedError` (every instance tried provably never got it)
        or :class:`WorkerFailedError` (a worker that may have received it
        failed, or its stream broke: never resent) — and under
        ``caller.flow``, :class:`OverloadedError` (it could not wait for a
        place; the stream holds its place until it ends). ``route``, if
        given, is filled with where the request went and why (the policy's
        reason)."""
        key = _key(params, worker_type)
        if key is None:
            raise InferenceError("Model name count not be empty")
        caller = await self._ready()
        async with self._place(key, params) as place:  # held until the stream ends
            sends = await self._sends(key, caller, params)
            for chosen in sends:
                if route is not None:
                    route.went(chosen, sends.reasons)
                try:
                    async with aclosing(caller.stream(chosen, "/generate_stream", params, headers)) as outputs:
                        async for output in outputs:
                            place.saw(output)
                            yield output
                    return
                except NeverSent as exc:
                    sends.never_sent(chosen, exc)
                except MaybeReceived as exc:
                    raise WorkerFailedError(f"{key} at {chosen.host}:{chosen.port}: {exc}",
                                            worker=f"{chosen.host}:{chosen.port}") from None
            raise sends.failure()

    async def embeddings(self, params: dict[str, Any]) -> list[list[float]]:
        """Vectors of ``params["input"]`` (scores, for a ``reranker``)."""
        key = _key(params, params.get("worker_type") or "text2vec")
        if key is None:
            raise InferenceError("Model name count not be empty")
        return await self._call(key, "POST", "/embeddings", json=params)

    def sync_embeddings(self, params: dict[str, Any]) -> list[list[float]]:
        return self._blocking(self.embeddings(params))

    async def count_token(self, params: dict[str, Any]) -> int:
        key = _key(params, "llm")
        if key is None:
            raise InferenceError("Model name count not be empty")
        return int(await self._call(key, "POST", "/count_token",
                                    json={"model": params["model"], "prompt": params.get("prompt", "")}))

    async def get_model_metadata(self, params: dict[str, Any]) -> ModelMetadata:
        key = _key(params, "llm")
        if key is None:
            raise InferenceError("Model name count not be empty")
        return ModelMetadata.model_validate(await self._call(key, "POST", "/model_metadata",
                                                             json={"model": params["model"]}))

    async def parameter_descriptions(self, worker_type: str, model_name: str) -> list[ParameterDescription]:
        key = worker_key(model_name, worker_type)
        answer = await self._call(key, "GET", "/parameter/descriptions",
                                  params={"model": model_name, "worker_type": worker_type})
        return [ParameterDescription.model_validate(d) for d in answer]

    async def select_one_instance(
        self, worker_type: str, model_name: str, healthy_only: bool = True
    ) -> ModelInstance:
        """The instance a request would go to now (healthy_only=False: any
        listed instance, at random, as DB-GPT does). Raises NoInstancesError."""
        key = worker_key(model_name, worker_type)
        if not healthy_only:
            listed = await self.get_model_instances(worker_type, model_name, healthy_only=False)
            if not listed:
                raise NoInstancesError(key)
            return (self._rng or random).choice(listed)
        caller = await self._ready()
        route = self._router.pick(key, limit=caller.settings.max_connections_per_worker)
        if route is None:
            raise NoInstancesError(key)
        return _instance(route)

    def sync_select_one_instance(
        self, worker_type: str, model_name: str, healthy_only: bool = True
    ) -> ModelInstance:
        return self._blocking(self.select_one_instance(worker_type, model_name, healthy_only))

    def in_flight(self) -> dict[tuple[str, int], int]:
        """Requests in flight from this process (every manager of this
        coordinator in it), per worker."""
        return self._router.in_flight()

    def demand(self, key: str, change: int) -> None:
        """``change`` more requests wait for ``key`` (a model@type) in a queue
        of this process's own (the gateway's flow control): the load reports
        count them as queued, demand the autoscaler adds to the model's load."""
        self._router.waiting(key, change)

    async def aclose(self) -> None:
        """Close this event loop's connections, and give back the process's
        route table (the last manager to give it back stops its follower).
        The manager can still be used: it takes the table again."""
        if self._release is not None:
            self._release()
            self._lease = self._release = None
        if self._caller is not None:
            await self._caller.aclose()

    # ---- internals --------------------------------------------------------

    @property
    def _router(self) -> Router:
        """The process's router of this coordinator, taken on first use and
        given back on aclose (or when this manager is collected)."""
        if self._lease is None:
            router = Router.acquire(self.cluster)
            self._lease, self._release = router, weakref.finalize(self, router.release)
        return self._lease

    async def _ready(self) -> WorkerCaller:
        """What an inference call needs: the caller, built from the
        coordinator's config, and the route table — the first call waits
        (bounded) for both, without blocking the event loop."""
        if self._caller is None:
            config = await self.cluster.aio.config()
            if self._caller is None:  # another call may have built it meanwhile
                self._flow = config.caller.flow if self._gated else None
                self._caller = WorkerCaller(config, self._read_timeout)
                self._router.configure(config.routing, config.caller.report_every, config.caller.report_ttl)
        router = self._router
        if not router.ready:
            # Polled, not waited for in a thread: a burst of first calls must
            # not hold the default thread pool while the coordinator is silent.
            router.start()
            deadline = time.monotonic() + ROUTES_WAIT
            while not router.ready and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        updates, at = self._pruned
        if router.updates != updates and time.monotonic() - at >= PRUNE_EVERY:
            self._pruned = (router.updates, time.monotonic())
            await self._caller.retain(router.endpoints())
        return self._caller

    async def _sends(self, key: str, caller: WorkerCaller, params: dict[str, Any] | None = None) -> _Sends:
        """The sends of one request. A model with no instance listed that
        scales from zero holds the request first (see :meth:`Router.hold`)
        and fails, if none came, saying so."""
        if not self._router.routes(key):
            held = await self._router.hold(key)
            if held and not self._router.routes(key):
                raise NoInstanceError(f"{key}: no instance ready within {held:.0f} s of asking for one (it scales "
                                      "from zero: autoscale.from_zero_timeout_s)", retry_after=5)
        return _Sends(self._router, key, caller.settings.max_connections_per_worker,
                      prompt_text(params) if params else None)

    async def routed_call(self, key: str, method: str, path: str, route: Routed | None = None,
                          **kwargs: Any) -> Any:
        """One non-streamed call (see :meth:`routed_stream` for what it raises
        and what ``route`` is filled with), sent again elsewhere only if it
        never reached a worker."""
        caller = await self._ready()
        async with self._place(key, kwargs.get("json"), gated=path in GATED_PATHS) as place:
            sends = await self._sends(key, caller, kwargs.get("json") if path == "/generate" else None)
            for chosen in sends:
                if route is not None:
                    route.went(chosen, sends.reasons)
                try:
                    answer = await caller.call(chosen, method, path, **kwargs)
                except NeverSent as exc:
                    sends.never_sent(chosen, exc)
                    continue
                except MaybeReceived as exc:
                    raise WorkerFailedError(
                        f"{key} at {chosen.host}:{chosen.port}: {path.lstrip('/')} failed: {exc}",
                        worker=f"{chosen.host}:{chosen.port}") from None
                if path == "/generate":
                    place.saw_answer(answer)
                return answer
            raise sends.failure()

    _call = routed_call

    @asynccontextmanager
    async def _place(self, key: str, params: dict[str, Any] | None, gated: bool = True) -> AsyncIterator[_Place]:
        """Hold a place under flow control (``caller.flow``) for one request
        while the block runs, waiting for it as needed, and charge its tenant
        what it cost when it ends. Raises :class:`OverloadedError` when it
        cannot wait. Without flow control (or ``gated=False``) it holds nothing."""
        flow = self._flow
        if flow is None or not gated:
            yield _Place()
            return
        share = flow.share(self.tenant)
        priority = share.priority if self.priority is None else self.priority
        if priority > share.top_priority:
            raise InferenceError(f"priority {priority} is above tenant {self.tenant!r}'s highest "
                                 f"({share.top_priority}: caller.flow max_priority)")
        gate = self._router.gate(flow)
        chars = _request_chars(params)
        model = (params or {}).get("model") or key.rpartition("@")[0] or key
        ticket = gate.ticket(self.tenant, str(model), priority, tokens_of(chars), time.monotonic() + flow.max_wait)
        try:
            await gate.enter(ticket, key=key)
        except FlowRefused as refused:
            why = refusal_message(refused, flow, section="caller.flow", who=f"tenant {self.tenant!r}",
                                  where=" in this process", retry=f"try again in {flow.retry_after} s")
            raise OverloadedError(why, refused.reason, self.tenant, flow.retry_after) from None
        place = _Place(gate, ticket, chars)
        try:
            yield place
        finally:
            place.leave()

    def _blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to the end from synchronous code, on a private loop
        (works from any thread, and from inside another running loop, which it
        blocks meanwhile)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self._sync_loop:
            coro.close()
            raise RuntimeError("a sync_* method of RayWorkerManager called from its own coroutine: await the "
                               "async method instead")
        with self._sync_lock:
            if self._sync_loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="worker-manager-sync", daemon=True).start()
                self._sync_loop = loop
        return asyncio.run_coroutine_threadsafe(coro, self._sync_loop).result()


class _Place:
    """A request's place under flow control (none without it), and what the
    request cost: its prompt, and its output as it comes."""

    def __init__(self, gate: FlowGate | None = None, ticket: FlowRequest | None = None, prompt_chars: int = 0) -> None:
        self._gate, self._ticket, self._prompt_chars = gate, ticket, prompt_chars
        self._output_chars = 0
        self._tokens: int | None = None

    def saw(self, output: ModelOutput) -> None:
        self._output_chars = self._output_chars + len(output.text) if output.incremental else len(output.text)
        total = (output.usage or {}).get("total_tokens")
        if isinstance(total, int):
            self._tokens = total

    def saw_answer(self, answer: Any) -> None:
        try:
            self.saw(ModelOutput.model_validate(answer))
        except ValueError:  # not an answer (generate says so to its caller)
            pass

    def leave(self) -> None:
        if self._gate is not None and self._ticket is not None:
            self._gate.leave(self._ticket, tokens_spent(self._prompt_chars, self._output_chars, self._tokens))


def _request_chars(params: dict[str, Any] | None) -> int:
    """The characters a request sends: its prompt, or the texts to embed."""
    prompt = prompt_text(params)
    if prompt is not None:
        return len(prompt)
    texts = (params or {}).get("input")
    if isinstance(texts, str):
        return len(texts)
    return sum(len(str(t)) for t in texts) if isinstance(texts, list) else 0


def _key(params: dict[str, Any], worker_type: str) -> str | None:
    model = params.get("model")
    return worker_key(model, worker_type) if model else None


class _Sends:
    """The sends of one request: iterating gives an instance for each (at most
    MAX_SENDS, none twice, none with ``limit`` requests in flight), counted in
    flight while the loop body runs — the generator's ``finally`` ends the
    count however the loop is left."""

    def __init__(self, router: Router, key: str, limit: int, prompt: str | None = None) -> None:
        self._router, self._key, self._limit, self._prompt = router, key, limit, prompt
        self._tried: dict[tuple[str, int], str] = {}  # endpoint -> why it failed ("" while in flight)
        #: Why each instance tried was chosen (the policy's reason), in order.
        self.reasons: list[str] = []

    def __iter__(self) -> Iterator[Route]:
        for _ in range(MAX_SENDS):
            chosen = self._router.choice(self._key, set(self._tried), limit=self._limit, claim=True,
                                         prompt=self._prompt)
            if chosen is None:
                return
            route, reason = chosen
            self.reasons.append(reason)
            self._tried[route.endpoint] = ""
            # Learned as it is sent, not when it ends: the worker computes the
            # prefix at once, and the next request of the same prefix (often
            # before this one's answer is over) must find it there.
            self._router.record(self._key, route.endpoint, self._prompt)
            try:
                yield route
            finally:
                self._router.end(self._key, route.endpoint)

    def never_sent(self, route: Route, exc: Exception) -> None:
        """It never reached the worker: suspect until the route table re-lists it."""
        self._router.suspect(route.endpoint)
        self._tried[route.endpoint] = str(exc)

    def failure(self) -> InferenceError:
        """Why the request went nowhere, as the error to raise."""
        message = self.none_left()
        if self._tried:
            return NotReachedError(message)
        return NoInstanceError(message, busy=bool(self._router.at_limit(self._key, self._limit)))

    def none_left(self) -> str:
        full = [f"{h}:{p}" for h, p in self._router.at_limit(self._key, self._limit) if (h, p) not in self._tried]
        at_limit = (f"{len(full)} instance(s) at the limit of {self._limit} requests in flight from this process "
                    f"(caller.max_connections_per_worker): {', '.join(full)}") if full else ""
        if not self._tried:
            if full:
                return f"{self._key}: not sent: every instance is busy: {at_limit}"
            return f"Cound not found worker instances for {self._key}: none is healthy, enabled and reachable"
        tried = ", ".join(f"{h}:{p} ({why})" for (h, p), why in self._tried.items())
        more = f"; {at_limit}" if full else ""
        return f"{self._key}: no instance could be reached (tried {tried}){more}"


def _instance(route: Route) -> ModelInstance:
    return ModelInstance(model_name=route.model_name, host=route.host, port=route.port, weight=route.weight,
                         healthy=True, enabled=True)
