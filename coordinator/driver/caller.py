"""HTTP from a caller's process to the workers, on the inference path.

:class:`WorkerCaller` carries a request the router chose to its worker, over
kept-open aiohttp sessions (one per event loop and worker), and turns what can
go wrong into one of two outcomes:

- :class:`NeverSent` — connection refused, connect timed out, no connection of
  the caller's own to that worker free within ``caller.pool_timeout``: the
  request provably never left, so it is safe to send elsewhere;
- :class:`MaybeReceived` — read timeout, connection lost after the request was
  written, a stream broken midway, an error status, an answer we cannot read:
  the worker may be carrying it out, so it is never resent.

Why aiohttp here and httpx in the proxies: this is the hop every token of every
request crosses, and aiohttp's client costs about a third of httpx's CPU per
request here (bench/transport.py, bench/gateway.py's cost phase). httpx-aiohttp
was measured and refused because it reports a connection dropped after the
request was sent as a connect timeout; this module maps aiohttp's own
exceptions, whose classes do tell the two apart (a :class:`aiohttp.ClientConnectorError`
is raised only while connecting, :class:`aiohttp.ConnectionTimeoutError` only
while waiting for a connection). The pool's limit is a semaphore of ours, so a
request that waits for a free connection and one that waits for a connect are
told apart too, and each is named in the error.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from coordinator.core.config import CallerSettings, CoordinatorConfig, WorkerAccess
from coordinator.core.inference import ChunkReader, ModelOutput, Route
from coordinator.core.models import Endpoint
from coordinator.plumbing.transport import KEEPALIVE_EXPIRY, cause, excerpt, ssl_context

__all__ = ["MaybeReceived", "NeverSent", "WorkerCaller", "classify"]


class NeverSent(Exception):
    """The request did not reach the worker (safe to send elsewhere)."""


class MaybeReceived(Exception):
    """The request may have reached the worker: never resent."""


#: How aiohttp (3.10 to 3.14 at least) begins the message of a request that
#: failed while being written. Only this and connecting are never sent; a
#: version that words it differently makes such a request "maybe received",
#: the safe side.
UNWRITTEN = "Can not write request"


def classify(exc: aiohttp.ClientError, read_timeout: float, connect_timeout: float) -> NeverSent | MaybeReceived:
    """What one of aiohttp's exceptions means for the request.

    Only a failure to get a connection is *never sent*: a connect that was
    refused, failed (DNS, unreachable host) or timed out. A TLS handshake
    failure is never sent too, but not worth sending elsewhere — another
    instance with the same settings fails the same way — so it ends the
    request with its reason, as the proxy does. Everything after the
    connection was made may have reached the worker.
    """
    if isinstance(exc, aiohttp.ClientSSLError):  # before ClientConnectorError, its base
        return MaybeReceived(f"TLS handshake failed: {cause(exc)}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return NeverSent(f"connection refused ({cause(exc.os_error)})")
    if isinstance(exc, aiohttp.ClientOSError) and (exc.strerror or "").startswith(UNWRITTEN):
        # The request could not be written whole: no server acts on a
        # request it has not read to the end of its body.
        return NeverSent(f"connection closed before the request was written ({cause(exc.__cause__ or exc)})")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return NeverSent(f"connect timed out after {connect_timeout:.3g} s")
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return MaybeReceived(f"no answer within {read_timeout:.3g} s")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return MaybeReceived(f"answer cut short ({cause(exc)})")
    return MaybeReceived(f"connection lost mid-call ({cause(exc)})")  # disconnected, reset, ...


@dataclass
class _Session:
    """One worker's kept-open connections in one event loop, and the
    semaphore that holds this process to ``caller.max_connections_per_worker``
    of them."""

    http: aiohttp.ClientSession
    slots: asyncio.Semaphore
    limit: int
    #: Requests holding a slot now (a session in use is never closed by retain).
    busy: int = 0


class WorkerCaller:
    """HTTP to the workers from the caller's process: kept-open sessions, one
    per event loop (an aiohttp session belongs to one loop) and worker, each
    with at most ``caller.max_connections_per_worker`` requests in flight; a
    request that finds none free within ``caller.pool_timeout`` is never sent
    (and goes elsewhere)."""

    def __init__(self, config: CoordinatorConfig, read_timeout: float) -> None:
        self._config = config
        self._settings: CallerSettings = config.caller
        self._read_timeout = read_timeout
        # Held strongly (a session holds its loop anyway): the sessions of a
        # loop that has closed are let go at the next new loop, and all of
        # them quietly when this caller goes (see _forget).
        # Loops of several threads share it (a manager's private loop, its
        # callers' own): the lock guards the outer dict (and changes to
        # _accesses); a loop's own sessions are touched only from that loop.
        self._sessions: dict[asyncio.AbstractEventLoop, dict[tuple[tuple[str, int], str], _Session]] = {}
        # Each worker's access settings and their JSON (what its sessions are
        # told apart by), by endpoint and listing sources: worked out on a
        # worker's first request, not on every one (the config is this
        # caller's for its life); let go with the worker (retain).
        self._accesses: dict[tuple[tuple[str, int], tuple[str, ...]], tuple[WorkerAccess, str]] = {}
        self._lock = threading.Lock()
        weakref.finalize(self, _forget_all, self._sessions, self._lock)

    @property
    def settings(self) -> CallerSettings:
        return self._settings

    def _session(self, route: Route, access: WorkerAccess, access_json: str) -> _Session:
        """This loop's session for ``route``'s worker called with ``access``
        (whose JSON is ``access_json``): equal settings share one, whichever
        sources listed the worker; changed settings get a new one."""
        loop = asyncio.get_running_loop()
        per_loop = self._sessions.get(loop)
        if per_loop is None:
            with self._lock:
                ended = [self._sessions.pop(other) for other in list(self._sessions) if other.is_closed()]
                per_loop = self._sessions.setdefault(loop, {})
            for sessions in ended:
                _forget(sessions)
        key = (route.endpoint, access_json)
        session = per_loop.get(key)
        if session is None:
            limit = self._settings.max_connections_per_worker
            tls: ssl.SSLContext | bool = ssl_context(access.tls) if access.tls is not None else True
            connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=KEEPALIVE_EXPIRY, ssl=tls,
                                             use_dns_cache=True)
            connect = self._config.timeouts.connect
            http = aiohttp.ClientSession(
                connector=connector,
                headers=access.http_headers(self._config.headers),
                # connect: getting a connection from the pool or opening one
                # (our semaphore has already waited for a free slot);
                # sock_read: between two reads, as httpx's read timeout.
                timeout=aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect,
                                              sock_read=self._read_timeout),
                json_serialize=_dumps,
                # Not Accept-Encoding either: the answers are read as they
                # come (a stream's chunks at once), never compressed.
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                auto_decompress=False,
            )
            session = per_loop[key] = _Session(http, asyncio.Semaphore(limit), limit)
        return session

    async def _slot(self, session: _Session) -> None:
        """Wait for one of this worker's connections; never sent if none frees in time."""
        # One turn of the loop first: a kept-open connection whose worker
        # closed it (or was killed) since its last use is then seen closed
        # and not reused, and the request opens a new connection instead —
        # refused, so never sent, rather than written into a dead one.
        await asyncio.sleep(0)
        try:
            async with asyncio.timeout(self._settings.pool_timeout):
                await session.slots.acquire()
        except TimeoutError:
            raise NeverSent(f"all {session.limit} connections to the worker busy for "
                            f"{self._settings.pool_timeout:.3g} s (never sent)") from None
        session.busy += 1

    @staticmethod
    def _free(session: _Session) -> None:
        session.busy -= 1
        session.slots.release()

    async def _answer_head(self, session: _Session, method: str, url: URL, **kwargs: Any) -> aiohttp.ClientResponse:
        """Send the request; the answer once its status and headers came. The
        whole of it — writing the request out (a worker that stops reading
        leaves a large one half written), then the answer's head — within the
        read timeout, as httpx's write and read timeouts did; past it, the
        request may have arrived."""
        try:
            async with asyncio.timeout(self._read_timeout):
                return await session.http.request(method, url, **kwargs)
        except TimeoutError as exc:
            if isinstance(exc, aiohttp.ClientError):  # aiohttp's own (connect) timeout: classified by the caller
                raise
            raise MaybeReceived(f"no answer within {self._read_timeout:.3g} s") from None

    def _failure(self, exc: aiohttp.ClientError) -> NeverSent | MaybeReceived:
        return classify(exc, self._read_timeout, self._config.timeouts.connect)

    async def retain(self, endpoints: set[tuple[str, int]]) -> None:
        """Close this loop's sessions of workers not in ``endpoints`` (gone from
        the route table) that nothing is using."""
        per_loop = self._sessions.get(asyncio.get_running_loop(), {})
        # Taken out before any await: a request meanwhile opens a new session.
        gone = [per_loop.pop(k) for k, v in list(per_loop.items()) if k[0] not in endpoints and not v.busy]
        with self._lock:
            for key in [k for k in self._accesses if k[0] not in endpoints]:
                del self._accesses[key]
        for session in gone:
            await session.http.close()

    @staticmethod
    def _url(route: Route, access: WorkerAccess, path: str) -> URL:
        return URL.build(scheme=access.scheme, host=route.host, port=route.port, path=f"/api/worker{path}")

    def _access(self, route: Route) -> tuple[WorkerAccess, str]:
        """How to call ``route``'s worker, and that as JSON."""
        found = self._accesses.get((route.endpoint, route.sources))
        if found is None:
            access = self._config.access_for(Endpoint(route.host, route.port), route.sources)
            found = (access, access.model_dump_json())
            with self._lock:
                self._accesses[route.endpoint, route.sources] = found
        return found

    async def call(self, route: Route, method: str, path: str, **kwargs: Any) -> Any:
        """One call; its JSON answer. Raises :class:`NeverSent` or :class:`MaybeReceived`."""
        access, access_json = self._access(route)
        session = self._session(route, access, access_json)
        await self._slot(session)
        try:
            resp = await self._answer_head(session, method, self._url(route, access, path), **kwargs)
            async with resp:
                body = await resp.read()
        except aiohttp.ClientError as exc:
            raise self._failure(exc) from exc
        finally:
            self._free(session)
        text = body.decode(errors="replace")
        if not 200 <= resp.status < 300:
            raise MaybeReceived(f"HTTP {resp.status}: {excerpt(text) or '(empty body)'}")
        try:
            return json.loads(body)
        except ValueError:
            raise MaybeReceived(f"answer is not JSON: {excerpt(text, 120)!r}") from None

    async def stream(self, route: Route, path: str, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> AsyncIterator[ModelOutput]:
        """The ModelOutputs of one streamed call, as they arrive. Raises
        :class:`NeverSent` before the first, :class:`MaybeReceived` at any point."""
        access, access_json = self._access(route)
        session = self._session(route, access, access_json)
        await self._slot(session)
        reader = ChunkReader()
        got = 0
        try:
            resp = await self._answer_head(session, "POST", self._url(route, access, path), json=body,
                                           headers=headers)
            async with resp:
                if not 200 <= resp.status < 300:
                    text = (await resp.read()).decode(errors="replace")
                    raise MaybeReceived(f"HTTP {resp.status}: {excerpt(text, 200)}")
                async for data in resp.content.iter_any():
                    for output in reader.feed(data):
                        got += 1
                        yield output
        except aiohttp.ClientError as exc:
            failure = self._failure(exc)
            if isinstance(failure, NeverSent) and got == 0:  # never once output was seen, whatever aiohttp says
                raise failure from exc
            raise MaybeReceived(f"stream broken after {got} chunks: {failure}") from exc
        except ValueError as exc:  # a chunk that is not a ModelOutput
            raise MaybeReceived(f"unreadable chunk after {got} chunks: {exc}") from exc
        finally:
            self._free(session)
        if reader.pending.strip():
            raise MaybeReceived(f"stream ended mid-chunk after {got} chunks")
        if got == 0:
            raise MaybeReceived("stream ended without output")

    async def aclose(self) -> None:
        """Close the sessions of the running loop."""
        with self._lock:
            sessions = self._sessions.pop(asyncio.get_running_loop(), {})
        for session in sessions.values():
            await session.http.close()


def _dumps(value: Any) -> str:
    # Compact, as a worker reads it either way; the prompt is most of the bytes.
    return json.dumps(value, separators=(",", ":"))


def _forget(per_loop: dict[Any, _Session]) -> None:
    """Let go of sessions whose loop ended without :meth:`WorkerCaller.aclose`
    (a driver's ``asyncio.run`` that returned), without awaiting: each is
    marked closed instead of logging "Unclosed client session" when it is
    collected. A closed loop's kept-open sockets close when they are
    collected (asyncio can no longer close them); a live loop's close now."""
    for session in per_loop.values():
        connector = session.http.connector
        session.http.detach()
        if connector is not None and not connector.closed:
            connector._close()  # the synchronous part of close(): no loop to await on
    per_loop.clear()


def _forget_all(sessions: dict[asyncio.AbstractEventLoop, dict[Any, _Session]], lock: threading.Lock) -> None:
    with lock:
        taken = list(sessions.items())
        sessions.clear()
    for loop, per_loop in taken:
        if loop.is_closed():
            _forget(per_loop)
        else:  # its sockets are the loop's to close, in its own thread
            try:
                loop.call_soon_threadsafe(_forget, per_loop)
            except RuntimeError:  # closed meanwhile
                _forget(per_loop)
