"""A reference worker manager: DB-GPT's worker-manager HTTP API over simulated
models, for the quick start, the tests and the benchmarks.

It behaves as docs/protocol.md says a real DB-GPT 0.8.2 worker manager does: it
registers itself as ``WorkerManager@service`` and each running model as
``{model}@{type}`` with a controller, sends heartbeats, marks a stopped model
unhealthy (still listed, so it can be started again), answers handler errors with
a bare ``500 Internal Server Error`` and bad bodies with FastAPI's 422.

It also answers DB-GPT's inference routes with simulated output: a
deterministic reply naming the model and the worker, streamed in ``chunks``
``chunk_delay`` seconds apart; embeddings of ``embedding_dim`` numbers. With
``WorkerSettings.engine`` set, generate requests also go through a cost model of
an LLM engine (reference_worker/engine.py: request slots, a prefix cache,
prefill and decode costs), whose vLLM-style load figures are on ``GET /metrics``
and whose per-request figures go in the journal entry's ``engine``.

Its models behave as the engines behind a real worker do. A model takes
``load_s`` seconds to load in every start (a start, a startup, the start half of
a restart or of an ``update_params`` that reloads); until then it is not
registered healthy, and inference on it is refused in DB-GPT's words ("Cound
not found worker instances ..."). A model that stops (``stop``, ``shutdown``, a
restart, a reloading ``update_params``) aborts every request in flight on it,
and on no other model, as an engine does when it begins to unload: a
``generate_stream`` ends broken, its connection dropped mid-body (as the
``stream_cut_after`` knob drops it), a ``generate`` is answered with the bare
500, and each aborted call's journal entry says ``"aborted": true``
(``ReferenceWorker.requests_in_flight`` holds them: reference_worker/inflight.py);
a generate call refused because its model is not running (loading, stopped,
not served here) says ``"refused": "<DB-GPT's words>"``.

Fault knobs (``/api/_reference/faults`` or :meth:`ReferenceWorker.set_faults`):
``latency`` added to every worker call, ``fail_next`` N calls answered 500,
``hang`` (accept and never answer), ``stream_cut_after`` N chunks. Every worker call is appended to a journal
(``/api/_reference/journal``), so tests can see the order operations arrived in;
it keeps the last ``JOURNAL_LIMIT`` calls, so a worker left running does not
grow without bound.

Run one as a process::

    python -m reference_worker --port 18001 \\
        --controller http://127.0.0.1:8000 --model chatgpt-test@llm

Why this module is long: it is one simulated server — DB-GPT's control and
inference routes, the registration and heartbeats, the journal and the fault
knobs act on the same state; its settings, the Ray host and the command line
live in their own modules.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import deque
from contextlib import aclosing
from typing import Any, Literal, NoReturn

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from actors.serving import HttpServer, read_body, replay
from coordinator.plumbing.transport import client_limits
from coordinator.core.config import ServeTls
from coordinator.core.inference import DELIMITER, ModelMetadata, ModelOutput, ParameterDescription
from coordinator.core.models import (
    WORKER_MANAGER_KEY,
    ApplyType,
    ModelInstance,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
    parse_worker_key,
    worker_key,
)
from reference_worker.engine import Engine, EngineFigures, prometheus_text, render_prompt
from reference_worker.inflight import InFlightRequests, ModelStopped
from reference_worker.sim import JOURNAL_LIMIT, KNOWN_PROVIDERS, Fault, Faults, SimModel, WorkerSettings, garbage, vector

log = logging.getLogger(__name__)

#: Where a worker call's journal entry travels in its ASGI scope (the engine's figures go in it).
JOURNAL_ENTRY = "reference_worker.journal_entry"


def cut_stream(why: str) -> NoReturn:
    """End a streamed answer broken. Raised out of a StreamingResponse's body
    (its headers already sent), it makes uvicorn drop the connection mid-body,
    with no last chunk and no clean end: how a lost connection, or an engine's
    abort, reaches a DB-GPT caller."""
    raise ConnectionAbortedError(f"stream cut ({why})")


#: Control calls: their journal entries say when the client went away before the
#: answer (``t_client_gone``). Not the streamed routes, which listen for that themselves.
CONTROL_PATHS = frozenset({"/api/worker/apply", "/api/worker/models/startup", "/api/worker/models/shutdown"})


async def client_gone(receive, entry: dict[str, Any]) -> None:
    """Once the body is read, the connection's ``receive`` returns only when
    the answer has been sent or the client has gone: in the second case (no
    ``t_end`` yet), put the time in the journal entry."""
    while (await receive())["type"] != "http.disconnect":
        pass  # each call waits for the connection's next event
    if "t_end" not in entry:
        entry["t_client_gone"] = time.time()


class ReferenceWorker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.models: dict[str, SimModel] = {m.key: m.model_copy() for m in settings.models}
        self.faults = settings.faults.model_copy()
        self.journal: deque[dict[str, Any]] = deque(maxlen=JOURNAL_LIMIT)
        #: Applies in progress per model key, and the most seen at once.
        self.inflight: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        #: Generate requests in flight per model key: a model that stops aborts its own.
        self.requests_in_flight = InFlightRequests()
        self._http = HttpServer(self._app(), settings.host, settings.port, tls=settings.tls)
        self._controller: httpx.AsyncClient | None = None
        self._controller_lock = asyncio.Lock()
        self._heartbeats: asyncio.Task[None] | None = None
        self._hung = asyncio.Event()  # set on stop, to release hung calls
        #: The cost-model engine of each LLM served (with ``settings.engine``).
        self._engines: dict[str, Engine] = {}

    @property
    def port(self) -> int:
        assert self._http.port is not None, "not started"
        return self._http.port

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> int:
        await self._http.start()
        if self.settings.controller:
            self._controller = httpx.AsyncClient(
                base_url=self.settings.controller, timeout=5, limits=client_limits()
            )
            await self._register_all()
            self._heartbeats = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        log.info("reference worker serving at %s", self.address)
        return self.port

    async def stop(self, deregister: bool = True) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        if self._controller is not None:
            if deregister:
                for key in [WORKER_MANAGER_KEY, *self.models]:
                    await self._deregister(key, remove=True)
            await self._controller.aclose()
        self._hung.set()
        await self._http.stop()

    def set_faults(self, **changes: Any) -> Faults:
        self.faults = Faults.model_validate({**self.faults.model_dump(), **changes})
        return self.faults

    # ---- the simulated worker manager -----------------------------------

    async def apply(self, req: WorkerApplyRequest) -> WorkerApplyOutput:
        self.inflight[req.key] = self.inflight.get(req.key, 0) + 1
        self.peak[req.key] = max(self.peak.get(req.key, 0), self.inflight[req.key])
        self.peak_total = max(self.peak_total, sum(self.inflight.values()))
        try:
            return await self._apply(req)
        finally:
            self.inflight[req.key] -= 1

    async def _apply(self, req: WorkerApplyRequest) -> WorkerApplyOutput:
        started = time.monotonic()
        model = self.models.get(req.key)
        if model is None:
            raise Fault(f"{req.key} is not served here")
        where = f"model {model.label}({self.address})"
        match req.apply_type:
            case ApplyType.START:
                await self._start(model)
                message = f"{where} start successfully"
            case ApplyType.STOP:
                await self._stop(model)
                message = f"{where} stop successfully"
            case ApplyType.RESTART:
                # DB-GPT stops, then starts, and reports in its start's words.
                await self._stop(model)
                await self._start(model)
                message = f"{where} start successfully"
            case ApplyType.UPDATE_PARAMS:
                # DB-GPT restarts only when a parameter actually changed.
                changed = any(model.params.get(k) != v for k, v in req.params.items())
                model.params.update(req.params)
                message = "Update worker params successfully"
                if changed:
                    await self._stop(model)
                    await self._start(model)
                    message = "Update worker params and restart successfully"
        return WorkerApplyOutput(message=message, success=True, timecost=round(time.monotonic() - started, 4))

    async def startup(self, req: WorkerStartupRequest) -> None:
        held = self.models.get(req.key)
        if held is not None and held.running:
            raise Fault(f"{req.key} is already running")
        provider = req.params.get("provider", "proxy/openai")
        if provider not in KNOWN_PROVIDERS:
            raise Fault(f"unknown provider {provider!r}")
        model = SimModel(
            name=req.model, worker_type=req.worker_type.value, provider=provider,
            params=dict(req.params), running=False,
        )
        self.models[model.key] = model
        await self._start(model)

    async def shutdown(self, req: WorkerStartupRequest) -> None:
        model = self.models.pop(req.key, None)
        if model is None:
            raise Fault(f"{req.key} is not served here")
        await self._stop(model)
        await self._deregister(model.key, remove=True)

    def supports(self) -> list[dict[str, Any]]:
        return [
            {
                "host": self.settings.host,
                "port": self.port,
                "models": [
                    {
                        "model": m.name, "worker_type": m.worker_type, "provider": m.provider,
                        "path": None, "path_exist": False, "proxy": m.provider.startswith("proxy/"),
                        "enabled": True, "params": [], "description": None,
                    }
                    for m in self.models.values()
                ],
            }
        ]

    async def _start(self, model: SimModel) -> None:
        if model.running:
            return
        await asyncio.sleep(self.settings.load_s)  # loading: held here, neither running nor registered
        model.running = True
        await self._register(model.key)

    async def _stop(self, model: SimModel) -> None:
        # An engine that begins to unload serves nothing more and aborts every
        # request it is running; only then does the unloading take its time.
        model.running = False
        self.requests_in_flight.abort(model.key)
        await asyncio.sleep(self.settings.stop_delay)
        await self._deregister(model.key, remove=False)

    # ---- simulated inference ----------------------------------------------

    def _serving(self, model: str | None, worker_type: str) -> str | None:
        """Why ``model`` cannot answer here (DB-GPT's words), or None."""
        if not model:
            return "Model name count not be empty"
        if not self._is_running(worker_key(model, worker_type)):
            return (f"Cound not found worker instances for model name {model} and worker type "
                    f"{worker_type}")
        return None

    def answer(self, params: dict[str, Any]) -> str:
        """The deterministic reply: names the model, this worker and the prompt."""
        messages = params.get("messages") or []
        asked = next((m.get("content", "") for m in reversed(messages)
                      if isinstance(m, dict) and m.get("role") in ("human", "user")), params.get("prompt", ""))
        return f"[{self.address}] {params.get('model')} answers: {asked}"

    def _usage(self, params: dict[str, Any], text: str) -> dict[str, int]:
        prompt = sum(len(str(m.get("content", "")).split()) for m in params.get("messages") or []
                     if isinstance(m, dict))
        return {"prompt_tokens": prompt, "completion_tokens": len(text.split()),
                "total_tokens": prompt + len(text.split())}

    def engine(self, model: str) -> Engine | None:
        """``model``'s cost-model engine (made on first use), or None when the engine is off."""
        if self.settings.engine is None:
            return None
        if model not in self._engines:
            self._engines[model] = Engine(self.settings.engine)
        return self._engines[model]

    def engine_figures(self) -> dict[str, EngineFigures]:
        """The engines' load figures per model name (every LLM served; empty when off)."""
        if self.settings.engine is None:
            return {}
        for m in list(self.models.values()):
            if m.worker_type == "llm":
                self.engine(m.name)
        return {name: engine.figures() for name, engine in sorted(self._engines.items())}

    def metrics_text(self) -> str:
        """``GET /metrics``: vLLM's load figures in Prometheus' text format."""
        self.engine_figures()  # every LLM served is listed, used or not
        return prometheus_text(self._engines)

    async def generate_stream(self, params: dict[str, Any], record: dict[str, Any] | None = None):
        """DB-GPT's chunks: the text so far, then a last one with finish_reason.
        With the engine on, the request first waits for a slot and pays its
        prefill, then each chunk's decode; what it cost goes in ``record["engine"]``.
        Raises :class:`ModelStopped` when the model stops before its last chunk."""
        problem = self._serving(params.get("model"), "llm")
        if problem:
            if record is not None:  # what the journal's readers count as refused (a model loading, say)
                record["refused"] = problem
            yield ModelOutput.error(problem)
            return
        in_flight = self.requests_in_flight.run(worker_key(params["model"], "llm"), self._generate(params, record),
                                                record)
        async with aclosing(in_flight) as outputs:
            async for output in outputs:
                yield output

    async def _generate(self, params: dict[str, Any], record: dict[str, Any] | None):
        """The model's work on one request it serves (see :meth:`generate_stream`)."""
        engine = self.engine(params["model"])
        if engine is None:
            async with aclosing(self._chunks(params, None)) as chunks:
                async for output in chunks:
                    yield output
            return
        admit = engine.admit(render_prompt(params))
        try:
            async with admit as admission:
                if record is not None:
                    record["engine"] = admission.as_dict()
                async with aclosing(self._chunks(params, lambda: engine.decode(admission))) as chunks:
                    async for output in chunks:
                        yield output
        finally:
            if record is not None:
                record["engine"] = admit.admission.as_dict()

    async def _chunks(self, params: dict[str, Any], decode):
        text = self.answer(params)
        words = text.split(" ")
        n = len(words)
        # `chunks` chunks (fewer only for a reply of fewer words), each the text so far.
        ends = sorted({max(1, round(n * i / self.settings.chunks)) for i in range(1, self.settings.chunks + 1)})
        for end in ends:
            if decode is not None:
                await decode()
            if self.settings.chunk_delay:
                await asyncio.sleep(self.settings.chunk_delay)
            so_far = " ".join(words[:end])
            last = end == n
            yield ModelOutput(text=so_far, finish_reason="stop" if last else None,
                              usage=self._usage(params, so_far) if last else None)

    async def generate(self, params: dict[str, Any], record: dict[str, Any] | None = None) -> ModelOutput:
        """The last chunk of :meth:`generate_stream` (raises :class:`ModelStopped` as it does)."""
        last = ModelOutput.error("no output")
        async with aclosing(self.generate_stream(params, record)) as outputs:
            async for last in outputs:
                pass
        return last

    def embeddings(self, params: dict[str, Any]) -> list[Any]:
        worker_type = params.get("worker_type") or "text2vec"
        problem = self._serving(params.get("model"), worker_type)
        if problem:
            raise Fault(problem)
        texts = params.get("input") or []
        if worker_type == "reranker":  # a score per candidate: shared words with the query
            query = set(str(params.get("query", "")).split())
            return [float(len(query & set(str(t).split()))) for t in texts]
        return [vector(f"{params.get('model')}:{t}", self.settings.embedding_dim) for t in texts]

    # ---- talking to the controller --------------------------------------

    def _instance(self, key: str) -> dict[str, Any]:
        return ModelInstance(model_name=key, host=self.settings.host, port=self.port, healthy=True).model_dump(
            mode="json"
        )

    async def _controller_call(self, method: str, path: str, only_if: str | None = None, **kwargs: Any) -> None:
        if self._controller is None:
            return
        try:
            # One call at a time, so the controller sees them in the order they
            # were made (a late heartbeat must not re-register a removed model).
            async with self._controller_lock:
                if only_if not in (None, WORKER_MANAGER_KEY) and not self._is_running(only_if):
                    return  # stopped or removed while this call waited its turn
                response = await self._controller.request(method, path, **kwargs)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            # The next heartbeat registers again; a controller outage is not ours to fix.
            log.warning("%s: controller call %s %s failed: %s %s", self.address, method, path,
                        type(exc).__name__, exc)

    async def _register(self, key: str) -> None:
        await self._controller_call("POST", "/api/controller/models", json=self._instance(key))

    async def _deregister(self, key: str, remove: bool) -> None:
        params = {"model_name": key, "host": self.settings.host, "port": self.port,
                  "remove_from_registry": str(remove).lower()}
        await self._controller_call("DELETE", "/api/controller/models", params=params)

    async def _register_all(self) -> None:
        await self._register(WORKER_MANAGER_KEY)
        for model in self.models.values():
            await self._register(model.key)
            if not model.running:  # listed, unhealthy: startable
                await self._deregister(model.key, remove=False)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            for key in [WORKER_MANAGER_KEY, *self.models]:
                # only_if: skipped, under the controller lock, unless still running.
                await self._controller_call("POST", "/api/controller/heartbeat", json=self._instance(key), only_if=key)

    def _is_running(self, key: str) -> bool:
        model = self.models.get(key)
        return model is not None and model.running

    # ---- HTTP -----------------------------------------------------------

    def _app(self) -> FastAPI:
        app = FastAPI(title="Reference worker manager", docs_url=None, redoc_url=None)

        @app.exception_handler(Fault)
        async def handler_failed(request: Request, exc: Fault) -> PlainTextResponse:
            # What DB-GPT answers when a handler raises: no detail.
            log.info("%s: %s", self.address, exc)
            return PlainTextResponse("Internal Server Error", status_code=500)

        @app.post("/api/worker/apply")
        async def apply(req: WorkerApplyRequest) -> WorkerApplyOutput:
            return await self.apply(req)

        @app.post("/api/worker/models/startup")
        async def startup(req: WorkerStartupRequest) -> None:
            await self.startup(req)

        @app.post("/api/worker/models/shutdown")
        async def shutdown(req: WorkerStartupRequest) -> None:
            await self.shutdown(req)

        @app.get("/api/worker/models/supports")
        async def supports() -> list[dict[str, Any]]:
            return self.supports()

        @app.get("/api/worker/parameter/descriptions")
        async def descriptions(model: str, worker_type: str = "llm") -> list[dict[str, Any]]:
            problem = self._serving(model, worker_type)
            if problem:
                raise Fault(problem)
            return [ParameterDescription(param_name=k, param_type=type(v).__name__, default_value=v).model_dump()
                    for k, v in sorted(self.models[worker_key(model, worker_type)].params.items())]

        @app.post("/api/worker/generate_stream")
        async def generate_stream(params: dict[str, Any], request: Request) -> StreamingResponse:
            cut = self.faults.stream_cut_after
            record = request.scope.get(JOURNAL_ENTRY)

            async def chunks():
                sent = 0
                try:
                    async with aclosing(self.generate_stream(params, record)) as outputs:
                        async for output in outputs:
                            if cut is not None and sent >= cut:
                                cut_stream("fault knob")
                            yield json.dumps(output.to_wire()).encode() + DELIMITER
                            sent += 1
                except ModelStopped as stopped:
                    cut_stream(str(stopped))

            return StreamingResponse(chunks())

        @app.post("/api/worker/generate")
        async def generate(params: dict[str, Any], request: Request) -> dict[str, Any]:
            return (await self.generate(params, request.scope.get(JOURNAL_ENTRY))).to_wire()

        @app.post("/api/worker/embeddings")
        async def embeddings(params: dict[str, Any]) -> list[Any]:
            return self.embeddings(params)

        @app.post("/api/worker/count_token")
        async def count_token(params: dict[str, Any]) -> int:
            problem = self._serving(params.get("model"), "llm")
            if problem:
                raise Fault(problem)
            return len(str(params.get("prompt", "")).split())

        @app.post("/api/worker/model_metadata")
        async def model_metadata(params: dict[str, Any]) -> dict[str, Any]:
            problem = self._serving(params.get("model"), "llm")
            if problem:
                raise Fault(problem)
            return ModelMetadata(model=params["model"], context_length=4096, max_output_length=1024,
                                 description=f"simulated by the reference worker at {self.address}").model_dump()

        @app.post("/api/_reference/faults")
        async def set_faults(changes: dict[str, Any]) -> Faults:
            return self.set_faults(**changes)

        @app.get("/api/_reference/journal")
        async def journal() -> list[dict[str, Any]]:
            return list(self.journal)

        if self.settings.engine is not None:  # without the engine there is no /metrics (404)

            @app.get("/metrics")
            async def metrics() -> PlainTextResponse:
                return PlainTextResponse(self.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

        return self._with_faults(app)

    def _with_faults(self, app: FastAPI):
        """A plain ASGI layer (cheaper than Starlette's BaseHTTPMiddleware) that
        journals every worker call and applies the fault knobs."""

        async def layer(scope, receive, send):
            if scope["type"] != "http" or not scope["path"].startswith("/api/worker"):
                return await app(scope, receive, send)
            body = await read_body(receive)
            if body is None:  # the client went away
                return
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode()
            entry = {"t": time.time(), "path": scope["path"], "body": body.decode(),
                     "authorization": authorization}
            self.journal.append(entry)
            # A control call's client may give up on it (its deadline, its
            # process killed) while it still runs here: note when.
            watch = (asyncio.get_running_loop().create_task(client_gone(receive, entry))
                     if scope["path"] in CONTROL_PATHS else None)
            try:
                await self._answer(app, entry, {**scope, JOURNAL_ENTRY: entry}, receive, send, body)
            finally:
                # When this call stopped running here: stamped in the same step
                # as the answer's last write (nothing awaits after it), so no
                # client can read the answer and send its next call first.
                entry["t_end"] = time.time()
                if watch is not None:
                    watch.cancel()

        return layer

    async def _answer(self, app, entry, scope, receive, send, body: bytes) -> None:
        """The fault knobs, then the app: one worker call."""
        token = self.settings.require_token
        if token is not None and not hmac.compare_digest(entry["authorization"], f"Bearer {token}"):
            return await PlainTextResponse("Unauthorized", status_code=401)(scope, receive, send)
        faults = self.faults
        if faults.hang:
            await self._hung.wait()
        if faults.latency:
            await asyncio.sleep(faults.latency)
        early = None
        if faults.garbage:
            early = garbage(faults.garbage)
        elif faults.fail_next > 0:
            faults.fail_next -= 1
            early = PlainTextResponse("Internal Server Error", status_code=500)
        if early is not None:
            return await early(scope, receive, send)
        await app(scope, replay(body, receive), send)
