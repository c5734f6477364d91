"""The gateway: OpenAI's API over the fleet, for every client that is not a
Python driver — OpenAI SDKs, LangChain, DB-GPT's own webserver, curl.

:class:`GatewayApp` is the ASGI application: ``POST /v1/chat/completions``
(SSE streaming and not), ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models``, and the same under ``/api/v1/`` as DB-GPT's API server
serves them. It checks the caller's key, bounds the body and the requests it
holds, parses and translates with :mod:`coordinator.core.openai`, and sends
through a :class:`~coordinator.driver.worker_manager.RayWorkerManager` — the
same router as every Python caller: the route table followed from the
coordinator (which is never on a request's path), the model's routing policy
(cache- and load-aware by default), per-worker connection limits, and
failover of what provably never reached a worker.

:class:`Gateway` is the Ray actor that serves it (started by
:func:`coordinator.driver.install.serve`; one per replica, restarted by Ray).

Why this module is long: the ASGI app and the actor that serves it are one
face of the fleet; each route is short, and they share the checks, the
admission under flow control, the failure mapping and the accounting that
make them answer alike.

With ``gateway.flow`` set, a request is offered to flow control
(:mod:`coordinator.driver.flow_gate`) once its body is read and before it is
sent: it runs at once, or waits for a place of its model by priority and by
its tenant's fair share, or is answered 429; its place is held until its
answer ends — a stream's last chunk, an error, or its client going away.
While it waits it is reported as queued for its model, with the replica's
load: demand the autoscaler sees.

What answers what: a bad body 400 naming the field (or a priority header out
of bounds), a bad or missing key 401, an unknown model 404, a body over the
limit 413, too many requests held (or every instance at its connection
limit; or under flow control, a full queue, a wait too long, the tenant's
limit) 429 with ``Retry-After``, a worker that failed 502, no instance to
send to (none healthy, or none reachable) 503, past
``gateway.request_timeout`` 504 — all in OpenAI's error shape. A
stream that breaks after its first chunk ends with an OpenAI error event
naming the worker; it is never resent. A client that goes away cancels the
worker call.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from actors.serving import HttpServer
from coordinator.core.config import OPEN_TENANT, GatewaySettings
from coordinator.core.flow import FlowRequest, tokens_of, tokens_spent
from coordinator.core.inference import ModelOutput
from coordinator.core.models import worker_key
from coordinator.core.openai import (
    SSE_DONE,
    OpenAILimits,
    StreamTranslator,
    WorkerAnswerError,
    chat_completion_response,
    completion_response,
    embeddings_response,
    error_response,
    make_id,
    models_response,
    parse_chat,
    parse_completion,
    parse_embeddings,
    sse,
    to_dbgpt_chat,
    to_dbgpt_completion,
    to_dbgpt_embeddings,
    validation_error_body,
    worker_error,
)
from coordinator.driver.flow_gate import ClientGone, FlowGate, FlowRefused, refusal_message
from coordinator.plumbing.metrics import GatewayMetrics, NoGatewayMetrics
from coordinator.plumbing.process import process_info

if TYPE_CHECKING:
    from coordinator.driver.worker_manager import RayWorkerManager

log = logging.getLogger(__name__)

#: Seconds a 429 asks the client to wait before trying again.
RETRY_AFTER = 1
#: Seconds within which the gateway's in-flight gauge follows its count.
GAUGE_EVERY = 0.1
#: Trace context headers passed on to the worker (W3C Trace Context).
TRACE_HEADERS = ("traceparent", "tracestate")
#: Worker types whose models ``GET /v1/models`` lists.
LISTED_TYPES = ("llm", "text2vec")


class _Failed(Exception):
    """A request answered with an error before any of its body was sent."""

    def __init__(self, status: int, body: dict[str, Any], retry_after: int | None = None) -> None:
        super().__init__(body["error"]["message"])
        self.status, self.body, self.retry_after = status, body, retry_after


def _error(situation: str, message: str, param: str | None = None, retry_after: int | None = None) -> _Failed:
    status, body = error_response(situation, message, param)
    return _Failed(status, body, retry_after)


@dataclass
class _Seen:
    """What is known of a request so far, for its accounting."""

    arrived: float  # monotonic
    model: str = "?"
    #: Its place under flow control while the handler holds it (a stream's
    #: body takes it over); what it cost, in characters and tokens.
    ticket: FlowRequest | None = None
    prompt_chars: int = 0
    output_chars: int = 0
    tokens: int | None = None

    def cost(self) -> float:
        return tokens_spent(self.prompt_chars, self.output_chars, self.tokens)


class _HeldStream(StreamingResponse):
    """A streamed answer that lets go of its place under flow control however
    it ends — even when its body never ran (a client gone before it started:
    the body's own ``finally`` then never runs).

    It streams in the handler's own task and watches for the client's
    disconnect beside it with plain asyncio, where Starlette (for a server of
    ASGI spec 2.3, as uvicorn says it is) runs the body in a task group of its
    own: one task less and no cancel scope on a request's path to its first
    token. A client gone cancels the body, and with it the worker call."""

    def __init__(self, content: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        watch = asyncio.ensure_future(_client_gone(receive))
        gone = finished = False

        def cancel(_: asyncio.Future) -> None:
            nonlocal gone
            # Not once the answer is over (a callback already queued when it
            # ended must not cancel the handler's next await).
            if finished or watch.cancelled() or watch.exception() is not None or streaming is None:
                return
            gone = True
            streaming.cancel()

        watch.add_done_callback(cancel)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            # Ours (the client went away) unless another cancel came too, as
            # the server's shutdown does: that one goes on.
            if not gone or streaming is None or streaming.uncancel():
                raise
            # Nothing more to send; the body lets go of its worker call now,
            # wherever it stopped (at a yield, the send was cancelled).
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            finished = True
            watch.remove_done_callback(cancel)
            watch.cancel()
            self._release()


def _instance(routed: Any) -> str:
    """Where a routed request went, as ``host:port`` ("" if nowhere)."""
    return "" if routed.route is None else f"{routed.route.host}:{routed.route.port}"


async def _client_gone(receive: Receive) -> None:
    """Return when the client has gone away. Its body was read already, so
    the next message it sends is its disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


class GatewayApp:
    """The ASGI application. ``manager`` is a RayWorkerManager (or anything
    with its ``routed_stream`` / ``routed_call`` / ``cluster.aio.instances``)."""

    def __init__(self, manager: Any, settings: GatewaySettings, metrics: GatewayMetrics | None = None) -> None:
        self._manager = manager
        self._settings = settings
        self._limits: OpenAILimits = settings.limits
        self._keys = [(key.encode(), tenant) for key, tenant in settings.key_tenants()]
        self._metrics = metrics or NoGatewayMetrics()
        # What waits in the gate is demand for its model: reported as queued with the process's load.
        demand = getattr(manager, "demand", None)
        self._flow = (FlowGate(settings.flow.policy(), self._metrics, demand=demand)
                      if settings.flow is not None else None)
        self.in_flight = 0
        self._gauge_due = False
        #: Counts for tests and the benchmark: routing decisions by reason, outcomes.
        self.reasons: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        routes = []
        for prefix in ("/v1", "/api/v1"):
            routes += [
                Route(f"{prefix}/chat/completions", self._chat, methods=["POST"]),
                Route(f"{prefix}/completions", self._completion, methods=["POST"]),
                Route(f"{prefix}/embeddings", self._embeddings, methods=["POST"]),
                Route(f"{prefix}/models", self._models, methods=["GET"]),
            ]
        self._router = Router(routes, default=self._not_found)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            if scope["path"].rstrip("/") == "/health":
                await JSONResponse({"status": "ok", "in_flight": self.in_flight, **self.flow_counts()})(
                    scope, receive, send)
                return
            request = Request(scope, receive)
            tenant = self._tenant(request)
            if tenant is None:
                await self._answer(_error("bad_key", "Incorrect API key provided (send it as "
                                          "'Authorization: Bearer <key>')"))(scope, receive, send)
                return
            request.state.tenant = tenant  # kept in the scope, for the route's handler
        await self._router(scope, receive, send)

    def flow_counts(self) -> dict[str, int]:
        """Under flow control: requests waiting for a place, and holding one."""
        if self._flow is None:
            return {}
        return {"flow_queued": self._flow.queued(), "flow_in_flight": self._flow.in_flight()}

    # ---- checks ---------------------------------------------------------

    def _tenant(self, request: Request) -> str | None:
        """The tenant of the caller's key; None for a bad or missing key."""
        if not self._keys:
            return OPEN_TENANT
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        given = key.strip().encode()
        # Every key compared, in constant time: how long it takes says nothing.
        found = None
        for expected, tenant in self._keys:
            if hmac.compare_digest(given, expected):
                found = tenant
        return found if scheme.lower() == "bearer" else None

    async def _body(self, request: Request) -> bytes:
        limit = self._limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _error("body_too_large", f"the request body is {declared} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _error("body_too_large", f"the request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parsed(self, request: Request, parse: Any) -> Any:
        """The request's body (bounded), parsed: a 400 naming the field if it is wrong."""
        body = await self._body(request)
        try:
            return parse(body, self._limits)
        except ValidationError as exc:
            raise _Failed(400, validation_error_body(exc)) from None

    def _answer(self, failed: _Failed) -> Response:
        headers = {"Retry-After": str(failed.retry_after)} if failed.retry_after is not None else None
        return JSONResponse(failed.body, status_code=failed.status, headers=headers)

    async def _not_found(self, scope, receive, send) -> None:
        await self._answer(_error("not_found", f"no route {scope['method']} {scope['path']} here"))(
            scope, receive, send)

    async def _unavailable(self, model: str, worker_type: str, why: str) -> _Failed:
        """No instance to send to: an unknown model (404) or one whose
        instances are all down (503)."""
        listed = await self._manager.cluster.aio.instances(model, worker_type, healthy_only=False)
        if not listed:
            return _error("unknown_model", f"The model '{model}' does not exist (no registry lists "
                                           f"{worker_key(model, worker_type)})", "model")
        return _error("no_instance", why)

    # ---- the routes -----------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        return await self._held(request, lambda seen: self._generate(request, seen, "chat"))

    async def _completion(self, request: Request) -> Response:
        return await self._held(request, lambda seen: self._generate(request, seen, "completion"))

    async def _embeddings(self, request: Request) -> Response:
        return await self._held(request, lambda seen: self._embed(request, seen))

    async def _held(self, request: Request, work: Callable[[_Seen], Awaitable[Response]]) -> Response:
        """Run one route's ``work`` holding a request (429 past
        ``gateway.max_in_flight``); a failure before any of the answer was sent
        becomes its error response, and is counted with its model. Its place
        under flow control, if it has one still, is let go of here."""
        seen = _Seen(time.monotonic())
        held = False
        try:
            self._hold()
            held = True
            return await work(seen)
        except _Failed as failed:
            self._done(seen.model, f"http_{failed.status}", seen.arrived)
            return self._answer(failed)
        except ClientGone:
            self._done(seen.model, "cancelled", seen.arrived)
            return Response(status_code=499)  # no one reads it
        finally:
            if held:
                self._count(-1)
            self._leave(seen)

    async def _admit(self, request: Request, seen: _Seen, prompt_chars: int, worker_type: str) -> None:
        """Wait for a place for ``seen.model`` under flow control (at once
        without it): 429 when the request cannot wait or waited too long,
        400 for a priority header out of bounds. While it waits it is
        demand for the model (queued in the load reports)."""
        flow = self._settings.flow
        if self._flow is None or flow is None:
            return
        tenant = request.state.tenant
        header = flow.priority_header
        try:
            priority = flow.share(tenant).priority_for(request.headers.get(header))
        except ValueError as exc:
            raise _error("bad_request", f"{header}: {exc}", header) from None
        seen.prompt_chars = prompt_chars
        deadline = seen.arrived + min(flow.max_wait, self._settings.request_timeout)
        ticket = self._flow.ticket(tenant, seen.model, priority, tokens_of(prompt_chars), deadline)
        try:
            await self._flow.enter(ticket, gone=lambda: _client_gone(request.receive),
                                   key=worker_key(seen.model, worker_type))
        except FlowRefused as refused:
            why = refusal_message(refused, flow, section="gateway.flow", who="this key's tenant",
                                  retry="try again shortly")
            raise _error("overloaded", why, retry_after=flow.retry_after) from None
        seen.ticket = ticket

    def _leave(self, seen: _Seen) -> None:
        """Let go of ``seen``'s place under flow control, charging its tenant
        what it cost (twice is harmless)."""
        if seen.ticket is not None and self._flow is not None:
            self._flow.leave(seen.ticket, seen.cost())

    async def _generate(self, request: Request, seen: _Seen, kind: Literal["chat", "completion"]) -> Response:
        arrived = seen.arrived
        req = await self._parsed(request, parse_chat if kind == "chat" else parse_completion)
        model = seen.model = req.model
        await self._admit(request, seen, sum(len(m.content) for m in req.messages) if kind == "chat"
                          else len(req.prompt), "llm")
        params = to_dbgpt_chat(req, self._limits) if kind == "chat" else to_dbgpt_completion(req)
        headers = {h: request.headers[h] for h in TRACE_HEADERS if h in request.headers}
        answer_id = make_id(kind, secrets.token_hex(12))
        created = int(time.time())
        deadline = arrived + self._settings.request_timeout
        if req.stream:
            return await self._stream(kind, req, params, headers, answer_id, created, seen, deadline)
        output = await self._whole(params, headers, arrived, deadline)
        body_out = (chat_completion_response if kind == "chat" else completion_response)(
            output, req.model, answer_id, created)
        seen.output_chars, seen.tokens = len(output.text), (body_out["usage"] or {}).get("total_tokens")
        self._done(model, "success", arrived)
        return JSONResponse(body_out)

    def _hold(self) -> None:
        """Count one request held; 429 past ``gateway.max_in_flight``."""
        if self.in_flight >= self._settings.max_in_flight:
            raise _error("overloaded", f"this gateway holds {self.in_flight} requests, its limit "
                                       "(gateway.max_in_flight); try again shortly", retry_after=RETRY_AFTER)
        self._count(1)

    def _count(self, change: int) -> None:
        """Count requests held; the gauge follows within GAUGE_EVERY seconds
        (set once for a burst of changes, not on each request's path)."""
        self.in_flight += change
        if not self._gauge_due:
            self._gauge_due = True
            asyncio.get_running_loop().call_later(GAUGE_EVERY, self._set_gauge)

    def _set_gauge(self) -> None:
        self._gauge_due = False
        self._metrics.in_flight(self.in_flight)

    def _done(self, model: str, outcome: str, arrived: float, instance: str = "") -> None:
        self.outcomes[outcome] += 1
        self._metrics.request(model, instance, outcome, time.monotonic() - arrived)

    def _first_token(self, model: str, routed: Any, seconds: float) -> None:
        self._metrics.first_token(model, self._routed(model, routed), seconds)

    def _routed(self, model: str, routed: Any) -> str:
        """Record the routing decision; the instance it went to."""
        if routed.route is None:
            return ""
        self.reasons[routed.reason] += 1
        self._metrics.decision(model, routed.reason)
        return _instance(routed)

    async def _map(self, exc: Exception, model: str, worker_type: str) -> _Failed:
        """A routed call's failure as the answer it gets."""
        from coordinator.driver.worker_manager import NoInstanceError, NotReachedError, WorkerFailedError

        if isinstance(exc, NoInstanceError):
            if exc.busy:
                return _error("overloaded", str(exc), retry_after=RETRY_AFTER)
            if exc.retry_after is not None:  # one is starting (a model scaled to zero): worth trying again
                return _error("no_instance", str(exc), retry_after=exc.retry_after)
            return await self._unavailable(model, worker_type, str(exc))
        if isinstance(exc, NotReachedError):
            return _error("no_instance", str(exc))
        if isinstance(exc, WorkerFailedError):
            status, body = worker_error(str(exc), exc.worker)
            return _Failed(status, body)
        if isinstance(exc, TimeoutError):
            return _error("deadline", f"no answer within gateway.request_timeout "
                                      f"({self._settings.request_timeout:g} s)")
        raise exc

    async def _whole(self, params: dict[str, Any], headers: dict[str, str], arrived: float,
                     deadline: float) -> ModelOutput:
        from coordinator.driver.worker_manager import InferenceError, Routed

        model = params["model"]
        routed = Routed()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                answer = await self._manager.routed_call(worker_key(model, "llm"), "POST", "/generate",
                                                         route=routed, json=params, headers=headers)
        except (InferenceError, TimeoutError) as exc:
            self._routed(model, routed)
            raise await self._map(exc, model, "llm") from None
        instance = self._routed(model, routed)
        self._metrics.first_token(model, instance, time.monotonic() - arrived)
        try:
            output = ModelOutput.model_validate(answer)
        except ValidationError:
            status, body = worker_error(f"{model} at {instance}: an answer that is not a ModelOutput", instance)
            raise _Failed(status, body) from None
        if not output.success:
            status, body = worker_error(f"{model} at {instance}: {output.text}", instance)
            raise _Failed(status, body)
        return output

    async def _stream(self, kind: Literal["chat", "completion"], req: Any, params: dict[str, Any],
                      headers: dict[str, str], answer_id: str, created: int, seen: _Seen,
                      deadline: float) -> Response:
        from coordinator.driver.worker_manager import InferenceError, Routed, WorkerFailedError

        model, arrived = req.model, seen.arrived
        routed = Routed()
        outputs = self._manager.routed_stream(params, route=routed, headers=headers)
        try:
            # The first output decides the status: before it, a failure is an
            # HTTP error (404, 429, 502, 503, 504); after it, an error event.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                first = await anext(outputs)
        except (InferenceError, TimeoutError, StopAsyncIteration) as exc:
            await outputs.aclose()
            self._routed(model, routed)
            if isinstance(exc, StopAsyncIteration):
                raise _error("worker_failed", f"{model}: the stream ended without output") from None
            raise await self._map(exc, model, "llm") from None
        first_at = time.monotonic()
        instance = _instance(routed)
        if not first.success:
            await outputs.aclose()
            self._routed(model, routed)
            status, body = worker_error(f"{model} at {instance}: {first.text}", instance)
            raise _Failed(status, body)
        translator = StreamTranslator(kind, id=answer_id, model=model, created=created,
                                      include_usage=req.include_usage, worker=instance)
        # Recorded at the loop's next turn: in practice once the first token
        # is written (nothing between here and that write waits), and even if
        # the client goes before the body runs.
        asyncio.get_running_loop().call_soon(self._first_token, model, routed, first_at - arrived)
        # The stream holds its place under flow control until it ends, not the handler.
        mine = _Seen(arrived, model, seen.ticket, seen.prompt_chars)
        seen.ticket = None

        async def body():
            # Held by the response body while it runs (the handler's hold ended
            # when it returned). A client gone before the body started never
            # runs it: nothing is counted, and the worker call is closed when
            # the stream is collected (asyncio finalises a started generator).
            self._count(1)
            outcome, ended = "success", False
            try:
                async with aclosing(outputs):
                    # The first output's events (the role, then the text) in
                    # one write: the first token is not a write behind.
                    yield b"".join(sse(chunk) for chunk in translator.feed(first))
                    try:
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            async for output in outputs:
                                if not output.success:
                                    outcome = "worker_error"
                                    yield sse(translator.error(output.text, instance))
                                    break
                                for chunk in translator.feed(output):
                                    yield sse(chunk)
                    except WorkerFailedError as exc:
                        outcome = "broken"
                        yield sse(translator.error(str(exc), exc.worker))
                    except TimeoutError:
                        outcome = "deadline"
                        yield sse(translator.error(
                            f"no end within gateway.request_timeout ({self._settings.request_timeout:g} s)",
                            instance))
                    if outcome == "success":
                        for chunk in translator.finish():
                            yield sse(chunk)
                    yield SSE_DONE
                    ended = True
            finally:
                if not ended:  # the client went away (cancelled, or closed mid-stream): the worker call with it
                    outcome = "cancelled"
                self._count(-1)
                mine.output_chars, mine.tokens = len(translator.text), (translator.usage or {}).get("total_tokens")
                self._leave(mine)
                self._done(model, outcome, arrived, instance)

        return _HeldStream(body(), lambda: self._leave(mine), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _embed(self, request: Request, seen: _Seen) -> Response:
        from coordinator.driver.worker_manager import InferenceError, Routed

        arrived = seen.arrived
        req = await self._parsed(request, parse_embeddings)
        model = seen.model = req.model
        await self._admit(request, seen, sum(len(text) for text in req.input), "text2vec")
        params = to_dbgpt_embeddings(req)
        routed = Routed()
        try:
            async with asyncio.timeout(max(0.0, arrived + self._settings.request_timeout - time.monotonic())):
                vectors = await self._manager.routed_call(worker_key(model, "text2vec"), "POST", "/embeddings",
                                                          route=routed, json=params)
        except (InferenceError, TimeoutError) as exc:
            self._routed(model, routed)
            raise await self._map(exc, model, "text2vec") from None
        instance = self._routed(model, routed)
        try:
            answer = embeddings_response(vectors, model, req.encoding_format, expected=len(req.input))
        except WorkerAnswerError as exc:
            status, body_out = worker_error(f"{model} at {instance}: {exc}", instance)
            raise _Failed(status, body_out) from None
        self._done(model, "success", arrived, instance)
        return JSONResponse(answer)

    async def _models(self, request: Request) -> Response:
        instances = await self._manager.cluster.aio.instances(None, None, True)
        names = sorted({i.model_name.split("@", 1)[0] for i in instances
                        if i.model_name.rpartition("@")[2] in LISTED_TYPES})
        return JSONResponse(models_response(names))


async def fleet_manager(coordinator: str, namespace: str) -> RayWorkerManager:
    """The RayWorkerManager a gateway sends through: the coordinator
    ``coordinator``'s fleet, its route table followed. (bench/gateway.py hosts
    :class:`GatewayApp` on Ray Serve with it too.)"""
    import ray

    from coordinator.driver.client import Cluster
    from coordinator.driver.worker_manager import RayWorkerManager

    # Looking the coordinator up asks the GCS, blocking: off the loop.
    handle = await asyncio.to_thread(ray.get_actor, coordinator, namespace=namespace)
    # Ungated: the gateway's own flow control (gateway.flow) gates its requests, not caller.flow.
    return RayWorkerManager(Cluster(coordinator, namespace, handle), flow=False)


class Gateway:
    """One gateway replica, as a Ray actor: serves :class:`GatewayApp` on
    ``gateway.host:port`` and follows the coordinator's route table."""

    def __init__(self, coordinator: str, namespace: str, settings: GatewaySettings, replica: int = 0,
                 export_metrics: bool = True) -> None:
        self._coordinator, self._namespace = coordinator, namespace
        self.settings = settings
        self._replica = replica
        self._metrics = GatewayMetrics(replica) if export_metrics else NoGatewayMetrics()
        self._app: GatewayApp | None = None
        self._http: HttpServer | None = None
        self._serving = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        self._manager = await fleet_manager(self._coordinator, self._namespace)
        self._app = GatewayApp(self._manager, self.settings, self._metrics)
        if self.settings.host not in ("127.0.0.1", "localhost", "::1") and not self.settings.keys():
            log.warning("the gateway serves %s:%s with no API key (gateway.allow_open)", self.settings.host,
                        self.settings.port)
        self._http = HttpServer(self._app, self.settings.host, self.settings.port, self.settings.tls,
                                reuse_port=True)
        await self._http.start()

    async def ready(self) -> str:
        """The gateway's base URL once it serves (raises why it could not)."""
        await asyncio.shield(self._serving)
        assert self._http is not None
        return self._http.url

    async def get_settings(self) -> GatewaySettings:
        return self.settings

    async def stats(self) -> dict[str, Any]:
        """Routing decisions by reason, outcomes, requests held now (and under
        flow control, waiting and holding a place)."""
        app = self._app
        if app is None:
            return {}
        return {"reasons": dict(app.reasons), "outcomes": dict(app.outcomes), "in_flight": app.in_flight,
                "replica": self._replica, **app.flow_counts()}

    async def process_info(self) -> dict[str, str | int | None]:
        return process_info()

    async def close(self) -> None:
        self._serving.cancel()
        if self._http is not None:
            await self._http.stop()
        manager = getattr(self, "_manager", None)
        if manager is not None:
            await manager.aclose()
