"""The boundary between httpx and the rest of the project.

:func:`map_transport_errors` turns every httpx exception into one of these, and
:func:`read_json` turns an answer that is not what the protocol promises into
:class:`WorkerBadAnswer`::

    WorkerCallError
    ├── WorkerUnreachable     connection refused, connect timeout, or no pooled
    │                         connection free in time: the request never reached
    │                         the worker, so resending it is safe
    ├── WorkerTLSError        the TLS handshake failed (the worker's certificate
    │                         is not trusted, or ours is refused): never sent,
    │                         and not resent — it would fail the same way
    ├── WorkerTimeout         no answer within the deadline; the worker may have
    │                         carried the request out
    ├── WorkerConnectionLost  the connection broke after the request was sent
    │                         (worker killed mid-call, truncated answer)
    ├── WorkerHTTPError       the worker answered with a non-2xx status
    └── WorkerBadAnswer       a 2xx answer we cannot read (not JSON, wrong shape)

These never leave the proxy: it turns them into ``WorkerApplyOutput(success=False)``.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from coordinator.core.config import TlsSettings

BODY_EXCERPT = 300

#: Idle connections are dropped after this many seconds. uvicorn (which DB-GPT's
#: servers run on) closes idle keep-alive connections after 5 s, httpx's own
#: default; with equal timers a request can be written onto a connection the
#: server is closing, and fail in a way that must not be retried. Expiring well
#: before the server does avoids that race.
KEEPALIVE_EXPIRY = 2.0


def ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The client side of https to workers: the CA bundle to trust (the system's
    when none is given) and, for mutual TLS, our certificate. Raises ``OSError``
    or ``ssl.SSLError`` when a file cannot be used."""
    context = ssl.create_default_context(cafile=str(tls.ca_bundle) if tls.ca_bundle else None)
    if tls.client_cert is not None:
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key) if tls.client_key else None)
    return context


def client_limits(max_connections: int = 100) -> httpx.Limits:
    return httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=min(32, max_connections),
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )


class WorkerCallError(Exception):
    #: Whether the request provably never reached the worker.
    never_sent: bool = False


class WorkerUnreachable(WorkerCallError):
    never_sent = True


class WorkerTLSError(WorkerCallError):
    never_sent = True


class WorkerTimeout(WorkerCallError):
    pass


class WorkerConnectionLost(WorkerCallError):
    pass


class WorkerHTTPError(WorkerCallError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {excerpt(body) or '(empty body)'}")
        self.status, self.body = status, body


class WorkerBadAnswer(WorkerCallError):
    pass


def excerpt(text: str, limit: int = BODY_EXCERPT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def map_transport_errors(
    timeout: float, *, pool_limit: int | None = None, pool_timeout: float | None = None
) -> Iterator[None]:
    """Re-raise httpx's exceptions as :class:`WorkerCallError` subclasses.
    ``pool_limit`` and ``pool_timeout`` describe the client's connection pool,
    for the message of a request that found no connection free."""
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise WorkerUnreachable("connect timed out") from exc
    except httpx.PoolTimeout as exc:
        within = pool_timeout if pool_timeout is not None else timeout
        limit = f"all {pool_limit} connections to the worker busy" if pool_limit else "no connection to the worker free"
        raise WorkerUnreachable(f"{limit} for {within:.3g} s (never sent)") from exc
    except httpx.ConnectError as exc:
        tls = _tls_failure(exc)
        if tls is not None:
            raise WorkerTLSError(f"TLS handshake failed: {tls}") from exc
        raise WorkerUnreachable(f"connection refused ({exc})" if str(exc) else "connection refused") from exc
    except httpx.TimeoutException as exc:
        raise WorkerTimeout(f"no answer within {timeout:.3g} s") from exc
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        raise WorkerConnectionLost(f"connection lost mid-call ({cause(exc)})") from exc
    except httpx.DecodingError as exc:
        raise WorkerBadAnswer(f"undecodable answer ({cause(exc)})") from exc
    except httpx.TransportError as exc:
        said = f": {exc}" if str(exc).strip() else ""
        raise WorkerConnectionLost(f"transport error ({type(exc).__name__}{said})") from exc


def cause(exc: BaseException) -> str:
    """What an exception says, or, when it says nothing (httpx raises
    ``ReadError('')`` for a connection closed without a word), its type's name."""
    return str(exc).strip() or type(exc).__name__


def _tls_failure(exc: BaseException) -> str | None:
    """What went wrong in the TLS handshake, when that is why a connection
    failed (the ssl error sits in the exception's chain)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLError):
            return str(exc) or type(exc).__name__
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def read_json(response: httpx.Response) -> Any:
    """The JSON body of a 2xx answer, or the error that says why there is none."""
    if not response.is_success:
        raise WorkerHTTPError(response.status_code, response.text)
    try:
        return response.json()
    except ValueError as exc:
        raise WorkerBadAnswer(f"answer is not JSON: {excerpt(response.text, 120)!r}") from exc
