"""Serve an ASGI app with uvicorn on the running event loop (an actor's, or a
process's own), on a socket we bind ourselves so that port 0 works and the bound
port is known before the first request."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable

import uvicorn

from coordinator.core.config import ServeTls


class HttpServer:
    def __init__(self, app, host: str, port: int, tls: ServeTls | None = None, reuse_port: bool = False) -> None:
        self.host = host
        #: Several servers (a gateway's replicas on one node) share the port;
        #: the kernel spreads the connections between them.
        self._reuse_port = reuse_port
        self._tls = tls
        self._requested_port = port
        self.port: int | None = None
        self._app = app
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}"

    async def start(self) -> int:
        """Bind, start serving, return the bound port. Raises ``OSError`` when the
        address is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # Say IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only
        # when the socket's proto says TCP. Without it Nagle's algorithm holds a
        # response's second write until the client's delayed ACK: ~40 ms a call.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        tls = self._tls
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            # Nothing here reads the client's address: no X-Forwarded-* rewriting
            # on every request (a middleware hop on the gateway's path).
            proxy_headers=False,
            timeout_graceful_shutdown=1,
            ssl_certfile=str(tls.cert) if tls else None,
            ssl_keyfile=str(tls.key) if tls else None,
            ssl_ca_certs=str(tls.client_ca) if tls and tls.client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("HTTP server exited during start-up")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout=5)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        self._server = self._task = None


class BodyTooLarge(Exception):
    pass


async def read_body(receive, limit: int | None = None) -> bytes | None:
    """For a plain ASGI layer: the whole request body, read before the app
    sees it; ``None`` if the client went away. Past ``limit`` bytes it stops
    reading and raises :class:`BodyTooLarge`."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if limit is not None and size > limit:
            raise BodyTooLarge(size)
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay(body: bytes, receive=None):
    """An ASGI ``receive`` that hands the app a body already read, once; after
    that it waits on the connection's own ``receive`` (for ``http.disconnect``,
    which a streaming response listens for), or forever without one."""
    given = False

    async def replayed():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is not None:
            return await receive()
        await asyncio.Event().wait()

    return replayed


async def serve_until_signalled(address: str, close: Callable[[], Awaitable[None]]) -> None:
    """For a server run as its own process: announce the address on stdout (the
    line a parent process waits for), run until SIGTERM or SIGINT, then close."""
    print(f"listening on {address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await close()
