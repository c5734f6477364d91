"""The embedded registry: DB-GPT's model-controller API, served from a Ray actor.

Real DB-GPT worker managers can use it as their ``controller_addr``; our watchers
follow it by long poll (:meth:`EmbeddedRegistry.wait_for_change`), so a
registration reaches the coordinator in milliseconds instead of a poll interval.

The class runs as a Ray actor (``ray.remote(EmbeddedRegistry)``) and, for tests,
as a plain object on any event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from actors.process import process_info
from actors.registry_state import GcsStateStore, Journal
from actors.registry_store import RegistryFull, RegistryStore
from coordinator.changes import Change
from coordinator.longpoll import ChangeFeed
from actors.serving import BodyTooLarge, HttpServer, read_body, replay, serve_until_signalled
from coordinator.config import EmbeddedSource
from coordinator.models import ModelInstance

log = logging.getLogger(__name__)


def controller_app(registry: EmbeddedRegistry, settings: EmbeddedSource | None = None):
    """DB-GPT's model-controller HTTP API over ``registry``, behind the guard
    that ``settings`` describe (token for writes, body size limit)."""
    app = FastAPI(title="Embedded model registry", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input back, and fails (500) on input
        # it cannot encode as JSON, such as a body of NaN. Say where and why only.
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(RegistryFull)
    async def full(request: Request, exc: RegistryFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(RegistryUnavailable)
    async def unavailable(request: Request, exc: RegistryUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

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

    settings = settings or EmbeddedSource()
    return _guard(app, settings.token.reveal() if settings.token else None, settings.max_body_bytes)


def _guard(app: FastAPI, token: str | None, max_body: int):
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
            await app(scope, replay(body), send)

    return guarded


class RegistryUnavailable(Exception):
    """A write could not be saved in time; it is not acknowledged."""


#: Seconds a write waits for the journal before it is refused (503).
SAVE_TIMEOUT = 10.0


class EmbeddedRegistry:
    """With a ``state`` (a :class:`Journal`, or the GCS key to keep one under),
    every write is saved before it is answered, and a restarted registry actor
    comes back on the same address with every acknowledged entry."""

    def __init__(
        self,
        settings: EmbeddedSource,
        state: Journal | str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._journal = Journal(GcsStateStore(), state) if isinstance(state, str) else state
        self._store = RegistryStore(settings.heartbeat_timeout, clock, max_entries=settings.max_instances)
        self._feed = ChangeFeed()
        self._published = self._store.changes.position
        self._http: HttpServer | None = None
        loop = asyncio.get_running_loop()
        self._serving = loop.create_task(self._start())
        self._expiry = loop.create_task(self._expiry_loop())
        self._saving: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        port = self._settings.port
        if self._journal is not None:
            saved = await self._journal.restore()
            if saved is not None:
                dropped = self._store.load(saved.entries)
                if dropped:
                    log.warning("registry dropped %d saved entries that are no longer valid, e.g. %s",
                                len(dropped), dropped[0])
                # Workers were not silent; the registry was away. Give them a
                # full timeout to be heard from again.
                self._store.touch_all()
                self._published = self._store.changes.position
                port = port or saved.port
                log.warning("registry restored %d entries; serving again on port %s", len(self._store), port)
        self._http = HttpServer(controller_app(self, self._settings), self._settings.host, port, self._settings.tls)
        await self._http.start()
        if self._journal is not None:
            await self._journal.start(self._http.port, self._store.changes)
            self._saving = asyncio.get_running_loop().create_task(self._save_loop())

    async def process_info(self) -> dict[str, str | int | None]:
        return process_info()

    async def ready(self) -> str:
        """The URL workers should use as ``controller_addr``, once serving."""
        await asyncio.shield(self._serving)
        assert self._http is not None
        return self._http.url

    # ---- the controller calls (also served over HTTP) -------------------

    async def list_instances(
        self, model_name: str | None = None, healthy_only: bool = False
    ) -> list[ModelInstance]:
        return self._store.query(model_name, healthy_only)

    async def register(self, instance: ModelInstance) -> bool:
        self._store.register(instance)
        return await self._acknowledge()

    async def heartbeat(self, instance: ModelInstance) -> bool:
        self._store.heartbeat(instance)
        return await self._acknowledge()

    async def deregister(self, model_name: str, host: str, port: int, remove: bool = False) -> bool:
        self._store.deregister(model_name, host, port, remove)
        return await self._acknowledge()

    # ---- for watchers ---------------------------------------------------

    async def wait_for_change(self, since: tuple[str, int] | None, timeout: float) -> Change | None:
        """What changed since ``since`` (an ``(epoch, version)`` from an earlier
        answer) as soon as anything did: a :class:`Delta`, or a :class:`Snapshot`
        for a listener that is new or too far behind; ``None`` when nothing
        changed within ``timeout`` seconds."""
        changes = self._store.changes
        if not await self._feed.wait_until(lambda: since != changes.position, timeout):
            return None
        return changes.since(since)

    async def close(self) -> None:
        self._expiry.cancel()
        if self._saving is not None:
            self._saving.cancel()
        if self._http is not None:
            await self._http.stop()

    async def forget(self) -> None:
        """Close, and delete the saved state (the registry is being removed)."""
        await self.close()
        if self._journal is not None:
            await self._journal.forget()

    # ---- internals ------------------------------------------------------

    async def _acknowledge(self) -> bool:
        """Tell the listeners, then answer once the registry's current state is
        saved (there may be a journal): an answered write is never lost, even
        one that changed nothing because an unsaved write had made the change."""
        self._publish()
        position = self._store.changes.position
        if self._journal is not None and not await self._feed.wait_until(
            lambda: self._journal.position is not None and self._journal.position >= position, SAVE_TIMEOUT
        ):
            raise RegistryUnavailable(f"the registry could not save the change within {SAVE_TIMEOUT:g} s")
        return True

    def _publish(self) -> None:
        """Wake the long polls (and the journal) if the store changed."""
        if self._store.changes.position != self._published:
            self._published = self._store.changes.position
            self._feed.notify()

    async def _save_loop(self) -> None:
        """Save what changed, one journal segment per pass: a burst of writes
        shares one KV write (group commit)."""
        assert self._journal is not None
        journal, changes = self._journal, self._store.changes
        while True:
            await self._feed.wait_until(lambda: journal.position != changes.position, timeout=3600)
            try:
                await journal.flush(changes)
            except Exception:
                log.exception("saving the registry state failed; retrying")
                await asyncio.sleep(1.0)
                continue
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


async def _serve(settings: EmbeddedSource) -> None:
    registry = EmbeddedRegistry(settings)
    await serve_until_signalled(await registry.ready(), registry.close)


def main(argv: list[str] | None = None) -> None:
    """Serve the registry as a plain process, without Ray: a stand-in for a
    DB-GPT model controller (``python -m actors.registry --port 8000``)."""
    parser = argparse.ArgumentParser(prog="python -m actors.registry", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--heartbeat-interval", type=float, default=20.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=60.0)
    parser.add_argument("--token-env", metavar="NAME",
                        help="require 'Authorization: Bearer <token>' for writes; the token is in this env var")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(EmbeddedSource(
        host=args.host, port=args.port,
        heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
        token={"env": args.token_env} if args.token_env else None,
    )))


if __name__ == "__main__":
    main()
