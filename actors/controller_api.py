"""DB-GPT's model-controller HTTP API, served over the embedded registry.

Built on Starlette's router, the layer FastAPI stands on, with each request
parsed by pydantic straight from its bytes: at fleet size a registry answers
hundreds of heartbeats a second, and FastAPI's per-request machinery
(dependency solving, response models, its middleware stack) was most of what
each one cost. The answers are FastAPI's, as DB-GPT's clients expect them,
including its 422 shape ``{"detail": [{"loc", "msg", "type"}]}`` — without
echoing the input back.

Routes (see docs/protocol.md)::

    GET    /api/health
    GET    /api/controller/models       ?model_name= &healthy_only=
    POST   /api/controller/models       ModelInstance   -> true
    DELETE /api/controller/models       ?model_name= &host= &port= &remove_from_registry=
    POST   /api/controller/heartbeat    ModelInstance   -> true
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from actors.registry_store import RegistryFull
from actors.serving import BodyTooLarge, read_body, replay
from coordinator.core.config import EmbeddedSource
from coordinator.core.models import ModelInstance, Port

if TYPE_CHECKING:
    from actors.registry import EmbeddedRegistry

_INSTANCES = TypeAdapter(list[ModelInstance])
_BOOL = TypeAdapter(bool)
_PORT = TypeAdapter(Port)
_TRUE = Response(b"true", media_type="application/json")


class RegistryUnavailable(Exception):
    """A write could not be saved in time; it is not acknowledged."""


class Invalid(Exception):
    """A request that does not say what the route needs: answered 422."""

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        self.detail = detail


def _errors(exc: ValidationError, where: tuple[str | int, ...]) -> list[dict[str, Any]]:
    return [{"loc": [*where, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def _instance(body: bytes) -> ModelInstance:
    try:
        return ModelInstance.model_validate_json(body)
    except ValidationError as exc:
        raise Invalid(_errors(exc, ("body",))) from None


def _query(request: Request, name: str, adapter: TypeAdapter | None = None, default: Any = ...) -> Any:
    value = request.query_params.get(name)
    if value is None:
        if default is ...:
            raise Invalid([{"loc": ["query", name], "msg": "Field required", "type": "missing"}])
        return default
    if adapter is None:
        return value
    if adapter is _BOOL and value == "":
        # DB-GPT's worker deregisters with `remove_from_registry=` (no value)
        # when it has no model storage; it means false.
        return False
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise Invalid(_errors(exc, ("query", name))) from None


def controller_app(registry: EmbeddedRegistry, settings: EmbeddedSource | None = None):
    """DB-GPT's model-controller HTTP API over ``registry``, behind the guard
    that ``settings`` describe (token for writes, body size limit)."""

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_models(request: Request) -> Response:
        found = await registry.list_instances(
            _query(request, "model_name", default=None), _query(request, "healthy_only", _BOOL, False)
        )
        return Response(_INSTANCES.dump_json(found), media_type="application/json")

    async def register(request: Request) -> Response:
        await registry.register(_instance(await request.body()))
        return _TRUE

    async def heartbeat(request: Request) -> Response:
        await registry.heartbeat(_instance(await request.body()))
        return _TRUE

    async def deregister(request: Request) -> Response:
        await registry.deregister(
            _query(request, "model_name"), _query(request, "host"), _query(request, "port", _PORT),
            _query(request, "remove_from_registry", _BOOL, False),
        )
        return _TRUE

    def answering(endpoint):
        """The route's errors as answers: 422, 409, 503."""
        async def route(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Invalid as exc:
                return JSONResponse({"detail": exc.detail}, status_code=422)
            except RegistryFull as exc:
                return JSONResponse({"detail": str(exc)}, status_code=409)
            except RegistryUnavailable as exc:
                return JSONResponse({"detail": str(exc)}, status_code=503)

        return route

    app = Router(routes=[
        Route("/api/health", answering(health), methods=["GET"]),
        Route("/api/controller/models", answering(list_models), methods=["GET"]),
        Route("/api/controller/models", answering(register), methods=["POST"]),
        Route("/api/controller/models", answering(deregister), methods=["DELETE"]),
        Route("/api/controller/heartbeat", answering(heartbeat), methods=["POST"]),
    ])
    settings = settings or EmbeddedSource()
    return _guard(app, settings.token.reveal() if settings.token else None, settings.max_body_bytes)


def _guard(app: Router, token: str | None, max_body: int):
    """A plain ASGI layer before the routes: writes (anything but GET/HEAD) need
    the token when one is set — refused before their body is read — and no
    request body may exceed ``max_body`` bytes."""
    expected = f"Bearer {token}".encode() if token else None
    too_large = JSONResponse({"detail": f"request body larger than {max_body} bytes"}, status_code=413)
    unauthorized = JSONResponse(
        {"detail": "this registry needs 'Authorization: Bearer <token>' to change it"},
        status_code=401, headers={"WWW-Authenticate": "Bearer"},
    )

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        if expected is not None and scope["method"] not in ("GET", "HEAD"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), expected):
                return await unauthorized(scope, receive, send)
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > max_body:
            return await too_large(scope, receive, send)
        try:
            body = await read_body(receive, max_body)  # chunked bodies are counted as they come
        except BodyTooLarge:
            return await too_large(scope, receive, send)
        if body is not None:
            await app(scope, replay(body, receive), send)

    return guarded
