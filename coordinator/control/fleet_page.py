"""The fleet page's server: a small ASGI app that the coordinator actor serves
on its own port (the config's ``page:`` section), read-only.

    GET  /              the page: static HTML, CSS and JS from the package
                        (``coordinator/control/static``), nothing fetched elsewhere
    GET  /api/fleet     the fleet as JSON (:func:`coordinator.core.fleet_page.fleet_snapshot`)
    GET  /api/events    the same as server-sent events: ``fleet`` with a snapshot
                        whenever it changed, ``tick`` every few seconds otherwise
    POST /login         ``{"key": "..."}``: a session cookie for a browser
    POST /logout        forgets it

Who may read: with keys (the gateway's), a caller sends one as
``Authorization: Bearer <key>`` (scripts, curl), or holds the session cookie
that ``/login`` — the page's own form — or ``/?key=<key>`` (a link; answered
with a redirect to ``/`` so the key leaves the address bar) sets. Keys are
compared in constant time, every one of them, as the gateway does. The
cookie holds no key: it is an expiry signed with a secret made when the
server starts (HttpOnly, SameSite=Strict, Secure under TLS), so a restarted
coordinator asks for the key again. Without keys it is open: the config
allows that on a loopback address only (or with ``page.allow_open``).

The page's assets need no key: they are the same for everyone and carry no
data. Everything it serves forbids framing and every origin but its own
(Content-Security-Policy), and the page writes what it shows as text, never
as markup.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route, Router

from coordinator.core.config import is_loopback

#: Seconds a snapshot is shared between every reader before it is built again.
SHARED_FOR = 0.5
#: Event streams open at once at most (each page holds one).
MAX_STREAMS = 64
#: Seconds an event stream waits for a change before it looks again anyway
#: (in-flight counts and probes change without waking the coordinator's feed).
LOOK_EVERY = 1.0
#: Seconds after a change before the next snapshot, so a burst travels as one.
PACE = 0.2
#: An event stream with nothing new sends a ``tick`` this often.
TICK_EVERY = 5.0
#: Bytes a login body may have.
LOGIN_BODY_LIMIT = 4096
#: Seconds a failed login waits before it is answered.
FAILED_LOGIN_DELAY = 0.25

ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/fleet.css": ("fleet.css", "text/css; charset=utf-8"),
    "/fleet.js": ("fleet.js", "text/javascript; charset=utf-8"),
}
SECURITY_HEADERS = {
    "content-security-policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def read_assets() -> dict[str, bytes]:
    """The page's files, from the package (read once, when the server is built)."""
    folder = resources.files("coordinator.control").joinpath("static")
    return {path: folder.joinpath(name).read_bytes() for path, (name, _) in ASSETS.items()}


class Sessions:
    """Session cookies: ``<expiry>.<signature>``, signed with a secret of this
    process. Nothing is kept per session."""

    def __init__(self, hours: float, clock: Callable[[], float] = time.time) -> None:
        self._secret = secrets.token_bytes(32)
        self.seconds = int(hours * 3600)
        self._clock = clock

    def _sign(self, expires: str) -> str:
        return hmac.new(self._secret, expires.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        expires = str(int(self._clock()) + self.seconds)
        return f"{expires}.{self._sign(expires)}"

    def valid(self, token: str) -> bool:
        expiry = self.expiry(token)
        return expiry is not None and expiry > self._clock()

    def expiry(self, token: str) -> float | None:
        """When a genuine token expires (None: not one of ours)."""
        expires, _, signature = token.partition(".")
        if not expires.isdigit() or len(expires) > 12:
            return None
        return float(expires) if hmac.compare_digest(signature.encode(), self._sign(expires).encode()) else None

    def now(self) -> float:
        return self._clock()


class SharedSnapshot:
    """One snapshot for every reader at a time: built at most once per
    ``SHARED_FOR`` seconds however many pages are open, and written out as
    JSON once per change (``version`` moves only when more than its time
    did), whatever the number of streams sending it."""

    def __init__(self, build: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._build = build
        self._lock = asyncio.Lock()
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self.version = 0
        self.payload = b""

    async def get(self) -> dict[str, Any]:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at >= SHARED_FOR:
                value = await self._build()
                if not _same(self._value, value):
                    self.version += 1
                    self.payload = json.dumps(value, separators=(",", ":")).encode()
                self._value = value
                self._at = time.monotonic()
            return self._value


def _loopback_host(request: Request) -> bool:
    """An open page (no keys) answers only requests addressed to a loopback
    name when it listens on loopback: a site that points its own name at
    127.0.0.1 (DNS rebinding) reaches the port but names itself in ``Host``."""
    server = request.scope.get("server") or ("", 0)
    if not is_loopback(str(server[0])):
        return True  # open off loopback: page.allow_open said so
    host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
    return is_loopback(host)


def _same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Equal but for the time they were taken."""
    return a is not None and {**a, "at": 0} == {**b, "at": 0}


class FleetPage:
    """The ASGI app. ``snapshot`` builds the page's JSON; ``changed(timeout)``
    returns when the fleet changed, or after ``timeout`` seconds."""

    def __init__(self, snapshot: Callable[[], Awaitable[dict[str, Any]]],
                 changed: Callable[[float], Awaitable[Any]], keys: list[str], session_hours: float = 12.0,
                 secure_cookie: bool = False) -> None:
        self._shared = SharedSnapshot(snapshot)
        self._changed = changed
        self._keys = [key.encode() for key in keys]
        self._sessions = Sessions(session_hours)
        self._secure = secure_cookie
        self._assets = read_assets()
        self._streams = 0
        self._router = Router([
            Route("/", self._index, methods=["GET"]),
            Route("/fleet.css", self._asset, methods=["GET"]),
            Route("/fleet.js", self._asset, methods=["GET"]),
            Route("/api/fleet", self._fleet, methods=["GET"]),
            Route("/api/events", self._events, methods=["GET"]),
            Route("/login", self._login, methods=["POST"]),
            Route("/logout", self._logout, methods=["POST"]),
        ])

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self._router(scope, receive, send)
            return

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
            await send(message)

        await self._router(scope, receive, with_headers)

    # ---- who may read -----------------------------------------------------

    @property
    def open(self) -> bool:
        return not self._keys

    def _known(self, key: str) -> bool:
        given = key.strip().encode()
        # Every key compared, in constant time: how long it takes says nothing.
        found = False
        for expected in self._keys:
            found |= hmac.compare_digest(given, expected)
        return found and bool(given)

    @staticmethod
    def _cookie_name(request: Request) -> str:
        # Cookies are per host, not per port: two coordinators' pages on one
        # host must not take each other's.
        server = request.scope.get("server") or ("", 0)
        return f"fleet_page_{server[1]}"

    def allowed(self, request: Request) -> bool:
        if self.open:
            return _loopback_host(request)
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return self._known(key)
        token = request.cookies.get(self._cookie_name(request))
        return token is not None and self._sessions.valid(token)

    def _with_session(self, response: Response, request: Request) -> Response:
        response.set_cookie(self._cookie_name(request), self._sessions.issue(), max_age=self._sessions.seconds,
                            path="/", httponly=True, samesite="strict", secure=self._secure)
        return response

    @staticmethod
    def _same_origin(request: Request) -> bool:
        """A POST from a page of another origin is refused (login CSRF)."""
        origin = request.headers.get("origin")
        if origin is None:  # not a browser's cross-site request: browsers send Origin with every POST
            return True
        return urlsplit(origin).netloc == request.headers.get("host", "")

    @staticmethod
    def _refused() -> Response:
        return JSONResponse({"error": "login", "message": "send a key: 'Authorization: Bearer <key>', or log in "
                             "on the page"}, status_code=401, headers={"cache-control": "no-store"})

    # ---- routes -----------------------------------------------------------

    async def _index(self, request: Request) -> Response:
        key = request.query_params.get("key")
        if key is not None and not self.open:
            if self._known(key):
                # The key leaves the address bar; the cookie stays.
                return self._with_session(RedirectResponse("/", status_code=303), request)
            await asyncio.sleep(FAILED_LOGIN_DELAY)
        return self._asset_response("/")

    async def _asset(self, request: Request) -> Response:
        return self._asset_response(request.url.path)

    def _asset_response(self, path: str) -> Response:
        return Response(self._assets[path], media_type=ASSETS[path][1], headers={"cache-control": "no-cache"})

    async def _fleet(self, request: Request) -> Response:
        if not self.allowed(request):
            return self._refused()
        return JSONResponse(await self._shared.get(), headers={"cache-control": "no-store"})

    async def _events(self, request: Request) -> Response:
        if not self.allowed(request):
            return self._refused()
        if self._streams >= MAX_STREAMS:
            return JSONResponse({"error": "busy", "message": f"{MAX_STREAMS} pages are open already"},
                                status_code=503, headers={"retry-after": "10"})
        # A stream a session opened ends with the session (the page then
        # reconnects, is refused, and asks to log in again).
        until = None if self.open or request.headers.get("authorization") else self._sessions.expiry(
            request.cookies.get(self._cookie_name(request), ""))
        return StreamingResponse(self._stream(until), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def _stream(self, until: float | None = None) -> AsyncIterator[bytes]:
        self._streams += 1
        try:
            yield b"retry: 2000\n\n"  # the browser's wait before it reconnects
            version = -1
            sent = time.monotonic()
            while until is None or self._sessions.now() < until:
                snapshot = await self._shared.get()
                if self._shared.version != version:
                    version = self._shared.version
                    sent = time.monotonic()
                    yield b"event: fleet\ndata: " + self._shared.payload + b"\n\n"
                elif time.monotonic() - sent >= TICK_EVERY:
                    sent = time.monotonic()
                    yield f"event: tick\ndata: {json.dumps({'at': snapshot['at']})}\n\n".encode()
                await self._changed(LOOK_EVERY)
                await asyncio.sleep(PACE)
        finally:
            self._streams -= 1

    async def _login(self, request: Request) -> Response:
        if not self._same_origin(request):
            return JSONResponse({"error": "origin", "message": "a login from another site"}, status_code=403)
        if self.open:
            return JSONResponse({"ok": True, "open": True})
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > LOGIN_BODY_LIMIT:
                return JSONResponse({"error": "too_large", "message": "the login body is too large"},
                                    status_code=413)
        try:
            key = json.loads(body or b"{}").get("key", "")
        except (ValueError, AttributeError):
            key = ""
        if not isinstance(key, str) or not self._known(key):
            await asyncio.sleep(FAILED_LOGIN_DELAY)
            return JSONResponse({"error": "bad_key", "message": "that key is not one of the gateway's keys"},
                                status_code=401)
        return self._with_session(JSONResponse({"ok": True}), request)

    async def _logout(self, request: Request) -> Response:
        if not self._same_origin(request):
            return JSONResponse({"error": "origin", "message": "a logout from another site"}, status_code=403)
        response = JSONResponse({"ok": True})
        response.delete_cookie(self._cookie_name(request), path="/", httponly=True, samesite="strict",
                               secure=self._secure)
        return response
