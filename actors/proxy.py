"""The worker proxy: the only code that talks HTTP to a worker manager.

One proxy serves one endpoint (host:port). It keeps one ``httpx.AsyncClient``
open for its worker, probes the worker on an interval, and turns every outcome of
an operation into a ``WorkerApplyOutput`` that names the worker — it never raises
for a worker's failure.

The same class runs as a Ray actor (``ray.remote(WorkerProxy)``, created by the
coordinator) and as a plain object in unit tests, where an
``httpx.MockTransport`` stands in for the network.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from coordinator.plumbing.process import process_info
from coordinator.plumbing.transport import (
    WorkerBadAnswer,
    WorkerCallError,
    WorkerTimeout,
    WorkerUnreachable,
    client_limits,
    map_transport_errors,
    read_json,
    ssl_context,
)
from coordinator.core.config import ProbeSettings, Timeouts, WorkerAccess
from coordinator.plumbing.metrics import NoMetrics, RayMetrics
from coordinator.core.secrets import redact
from coordinator.core.models import (
    Endpoint,
    SupportsOutcome,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
    WorkerSupportedModel,
)

log = logging.getLogger(__name__)

_SUPPORTED = TypeAdapter(list[WorkerSupportedModel])

#: Resends of a request that provably never reached the worker, and the pause
#: before each.
RETRY_BACKOFF = (0.2, 0.5)


class ProbeState(BaseModel):
    """What the proxy knows first-hand about its worker."""

    reachable: bool | None = None  # None: not probed yet
    consecutive_failures: int = 0
    last_error: str | None = None
    last_ok: float | None = None  # wall-clock seconds
    checked_at: float | None = None
    #: The last probe's connection was refused: the host answers and nothing
    #: listens on the port — the worker is dead, not merely slow to answer.
    refused: bool = False


ProbeListener = Callable[[Endpoint, ProbeState], Awaitable[None] | None]


class WorkerProxy:
    def __init__(
        self,
        host: str,
        port: int,
        timeouts: Timeouts | None = None,
        probe: ProbeSettings | None = None,
        headers: dict[str, str] | None = None,
        access: WorkerAccess | None = None,
        on_probe_change: ProbeListener | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        export_metrics: bool = False,
    ) -> None:
        self._metrics = RayMetrics() if export_metrics else NoMetrics()
        self.endpoint = Endpoint(host, port)
        self._timeouts = timeouts or Timeouts()
        self._probe_settings = probe or ProbeSettings()
        self._on_probe_change = on_probe_change
        self._clock = clock
        access = self._access = access or WorkerAccess()
        # Built once per proxy. A file that cannot be used fails every call with
        # the reason, rather than the proxy failing to start again and again.
        self._tls_error: str | None = None
        verify: ssl.SSLContext | bool = True
        self._probe_tls: ssl.SSLContext | None = None
        if access.tls is not None:
            try:
                verify = self._probe_tls = ssl_context(access.tls)
            except (OSError, ssl.SSLError) as exc:
                self._tls_error = f"TLS setup failed: {type(exc).__name__}: {exc}"
                log.error("%s: %s", self.endpoint, self._tls_error)
        self._client = httpx.AsyncClient(
            # From parts, never pasted text: the host is a validated bare name or IP.
            base_url=httpx.URL(scheme=access.scheme, host=host, port=port, path="/api/worker"),
            headers=access.http_headers(headers),
            transport=transport,
            limits=client_limits(256),
            verify=verify,
        )
        self._state = ProbeState()
        self._closed = asyncio.Event()
        self._probe_task: asyncio.Task[None] | None = None
        if self._probe_settings.enabled:
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    # ---- operations -----------------------------------------------------

    async def apply(self, req: WorkerApplyRequest | str, deadline_at: float | None = None) -> WorkerApplyOutput:
        """``req`` may come as its JSON text: the coordinator serialises a request
        once per apply instead of once per proxy, and the text is sent as is.
        With ``deadline_at`` (wall-clock seconds: the caller's deadline, which
        counts the time the call spent reaching this proxy), the call ends by
        then, resends included, and nothing is sent after it."""
        if isinstance(req, str):
            content = req.encode()
            req = WorkerApplyRequest.model_validate_json(content)
        else:
            content = req.model_dump_json().encode()
        what = f"apply {req.apply_type.value} {req.key}"

        async def call(deadline: float | None) -> WorkerApplyOutput:
            body = await self._request(
                "POST", "/apply", "apply", deadline, content=content, headers={"content-type": "application/json"}
            )
            try:
                out = WorkerApplyOutput.model_validate(body)
            except ValidationError as exc:
                raise WorkerBadAnswer(f"answer is not a WorkerApplyOutput: {_first_error(exc)}") from exc
            return out.model_copy(update={
                "host": self.endpoint.host, "port": self.endpoint.port,
                "message": self._scrub(out.message),
            })

        return await self._operate(what, call, deadline_at)

    async def startup(self, req: WorkerStartupRequest, deadline_at: float | None = None) -> WorkerApplyOutput:
        return await self._lifecycle("startup", "/models/startup", req, deadline_at)

    async def shutdown(self, req: WorkerStartupRequest, deadline_at: float | None = None) -> WorkerApplyOutput:
        return await self._lifecycle("shutdown", "/models/shutdown", req, deadline_at)

    async def supports(self) -> SupportsOutcome:
        if self._tls_error is not None:
            return SupportsOutcome(endpoint=self.endpoint, error=f"{self.endpoint}: {self._tls_error}")
        try:
            body = await self._with_retries(
                lambda deadline: self._request("GET", "/models/supports", "supports", deadline), None
            )
            try:
                models = _SUPPORTED.validate_python(body)
            except ValidationError as exc:
                raise WorkerBadAnswer(
                    f"answer is not a list of WorkerSupportedModel: {_first_error(exc)}"
                ) from exc
            return SupportsOutcome(endpoint=self.endpoint, models=models)
        except WorkerCallError as exc:
            error = self._scrub(f"{self.endpoint}: supports failed: {exc}")
            return SupportsOutcome(endpoint=self.endpoint, error=error)

    async def probe_state(self) -> ProbeState:
        return self._state

    async def probe_now(self) -> ProbeState:
        """Probe the worker now (besides the periodic probes) and say what was
        found: fresh evidence, for a rollout's health gate."""
        await self._probe_once()
        return self._state

    async def process_info(self) -> dict[str, str | int | None]:
        """Where this proxy runs: Ray node (None outside Ray) and PID."""
        return process_info()

    async def lifeline(self) -> None:
        """Returns only when the proxy is closed. The coordinator keeps one call to
        it pending, so the proxy's death reaches it at once, as an error."""
        await self._closed.wait()

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        self._closed.set()
        await self._client.aclose()

    # ---- internals ------------------------------------------------------

    async def _lifecycle(
        self, op: str, path: str, req: WorkerStartupRequest, deadline_at: float | None
    ) -> WorkerApplyOutput:
        started = time.monotonic()

        async def call(deadline: float | None) -> WorkerApplyOutput:
            # DB-GPT answers a successful startup/shutdown with a bare `null`.
            await self._request("POST", path, op, deadline, json=req.model_dump(mode="json"))
            return self._output(f"{op} {req.key} succeeded", True, started)

        return await self._operate(f"{op} {req.key}", call, deadline_at)

    async def _operate(
        self, what: str, call: Callable[[float | None], Awaitable[WorkerApplyOutput]], deadline_at: float | None
    ) -> WorkerApplyOutput:
        started = time.monotonic()
        deadline = None if deadline_at is None else started + (deadline_at - self._clock())
        if self._tls_error is not None:
            return self._output(f"{what} not sent: {self._tls_error}", False, started)
        if self._state.reachable is False:
            return self._output(
                f"{what} not sent: worker unreachable ({self._state.consecutive_failures} "
                f"failed probes; last: {self._state.last_error})",
                False,
                started,
            )
        try:
            return await self._with_retries(call, deadline)
        except WorkerCallError as exc:
            return self._output(f"{what} failed: {exc}", False, started)

    async def _with_retries(self, call: Callable[[float | None], Awaitable[Any]], deadline: float | None) -> Any:
        """Resend only what provably never reached the worker, and only while
        the deadline (monotonic seconds) leaves room."""
        for pause in (*RETRY_BACKOFF, None):
            try:
                return await call(deadline)
            except WorkerUnreachable:
                if pause is None or (deadline is not None and time.monotonic() + pause >= deadline):
                    raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def _request(self, method: str, path: str, op: str, deadline: float | None, **kwargs: Any) -> Any:
        limit = self._timeouts.for_operation(op)
        if deadline is not None:
            limit = min(limit, deadline - time.monotonic())
            if limit <= 0:
                raise WorkerTimeout("not sent: the operation's deadline had passed")
        timeout = httpx.Timeout(limit, connect=min(self._timeouts.connect, limit))
        with map_transport_errors(limit):
            response = await self._client.request(method, path, timeout=timeout, **kwargs)
        return read_json(response)

    def _scrub(self, text: str) -> str:
        return redact(text, self._access.secret_values())

    def _output(self, message: str, success: bool, started: float) -> WorkerApplyOutput:
        return WorkerApplyOutput(
            # A worker may echo what it was sent (a 401 page quoting the header).
            message=self._scrub(f"{self.endpoint}: {message}"),
            success=success,
            timecost=round(time.monotonic() - started, 4),
            host=self.endpoint.host,
            port=self.endpoint.port,
        )

    async def _probe_loop(self) -> None:
        settings = self._probe_settings
        while True:
            started = time.monotonic()
            try:
                await self._probe_once()
            except Exception:  # the loop survives; the logic raised
                log.exception("probe of %s failed unexpectedly", self.endpoint)
            await asyncio.sleep(max(0.0, settings.interval - (time.monotonic() - started)))

    async def _probe_once(self) -> None:
        """Does the worker's server answer? A TCP connection is not enough: a
        paused or wedged process still completes handshakes from its listen
        backlog. So the probe asks for ``/`` over plain HTTP and waits for the
        status line (any status will do), or for a TLS worker completes the
        TLS handshake — both need the server's own code to run."""
        settings = self._probe_settings
        loop = asyncio.get_running_loop()
        ends = loop.time() + settings.timeout
        error: str | None = None
        refused = False
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.endpoint), timeout=settings.timeout)
        except TimeoutError:
            error = f"connect timed out after {settings.timeout:g} s"
        except ConnectionRefusedError as exc:
            error, refused = exc.strerror or "connection refused", True
        except OSError as exc:
            error = exc.strerror or str(exc) or type(exc).__name__
            # A name with several addresses fails with one OSError holding every
            # attempt's error: refused only if each attempt was.
            errnos = re.findall(r"\[Errno (\d+)\]", str(exc))
            refused = exc.errno == errno.ECONNREFUSED or (bool(errnos) and all(
                int(n) == errno.ECONNREFUSED for n in errnos))
        else:
            try:
                error = await asyncio.wait_for(self._answers(reader, writer), max(0.01, ends - loop.time()))
            except TimeoutError:
                error = f"no answer within {settings.timeout:g} s (connected, but the server does not respond)"
            finally:
                writer.close()
        await self._record_probe(error, refused)

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        """None if the server answered on this connection, else why not."""
        try:
            if self._access.tls is not None:
                if self._probe_tls is not None:  # the handshake itself is the answer; its verdict is not ours
                    try:
                        await writer.start_tls(self._probe_tls, server_hostname=self.endpoint.host)
                    except ssl.SSLError:
                        pass
                return None
            host = self.endpoint.host if ":" not in self.endpoint.host else f"[{self.endpoint.host}]"
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{self.endpoint.port}\r\n"
                         "User-Agent: coordinator-probe\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            line = await reader.readline()
        except (ConnectionError, OSError) as exc:
            return f"connection lost before an answer ({exc.strerror or type(exc).__name__})"
        return None if line.startswith(b"HTTP/") else "closed the connection without an HTTP answer"

    async def _record_probe(self, error: str | None, refused: bool = False) -> None:
        now = self._clock()
        old = self._state
        if error is None:
            new = ProbeState(reachable=True, last_ok=now, checked_at=now)
        else:
            failures = old.consecutive_failures + 1
            dead = failures >= self._probe_settings.failures_to_dead
            new = ProbeState(
                reachable=False if dead else old.reachable,
                consecutive_failures=failures,
                last_error=error,
                last_ok=old.last_ok,
                checked_at=now,
                refused=refused,
            )
        self._state = new
        self._metrics.probe(str(self.endpoint), new.consecutive_failures)
        changed = new.reachable != old.reachable or (new.reachable is False and new.refused != old.refused)
        if changed and self._on_probe_change is not None:
            result = self._on_probe_change(self.endpoint, new)
            if asyncio.iscoroutine(result):
                await result


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(root)"
    return f"{loc}: {err['msg']}"
