"""The proxy turns every worker outcome into a WorkerApplyOutput naming the worker.
A mock transport stands in for the network; probes are fed by hand."""

from __future__ import annotations

import httpx
import pytest

from actors.proxy import WorkerProxy
from coordinator.core.config import ProbeSettings, Timeouts
from coordinator.core.models import WorkerApplyRequest, WorkerStartupRequest

pytestmark = pytest.mark.anyio

APPLY = WorkerApplyRequest(model="m", apply_type="restart")
STARTUP = WorkerStartupRequest(host="127.0.0.1", port=18001, model="m2", worker_type="llm")
NO_PROBE = ProbeSettings(enabled=False)


def proxy_with(handler, **kw) -> tuple[WorkerProxy, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    proxy = WorkerProxy(
        "127.0.0.1", 18001, probe=kw.pop("probe", NO_PROBE), transport=httpx.MockTransport(record), **kw
    )
    return proxy, seen


async def test_success_keeps_the_workers_own_message_and_names_the_worker():
    proxy, seen = proxy_with(
        lambda r: httpx.Response(200, json={"message": "model m restart successfully", "success": True, "timecost": 0.1})
    )
    out = await proxy.apply(APPLY)
    assert (out.success, out.message, out.timecost) == (True, "model m restart successfully", 0.1)
    assert (out.host, out.port) == ("127.0.0.1", 18001)
    assert seen[0].url.path == "/api/worker/apply"


@pytest.mark.parametrize(
    ("response", "needle"),
    [
        (httpx.Response(500, text="Internal Server Error"), "HTTP 500: Internal Server Error"),
        (httpx.Response(422, json={"detail": [{"msg": "bad apply_type"}]}), "HTTP 422"),
        (httpx.Response(500, html="<html><body><h1>oops</h1></body></html>"), "HTTP 500: <html>"),
        (httpx.Response(200, text="not json"), "not JSON"),
        (httpx.Response(200, json={"msg": "wrong shape"}), "not a WorkerApplyOutput"),
        (httpx.Response(200, text='{"message": "trunc'), "not JSON"),
    ],
)
async def test_bad_answers_become_failed_outputs_with_the_reason(response, needle):
    proxy, _ = proxy_with(lambda r: response)
    out = await proxy.apply(APPLY)
    assert out.success is False
    assert needle in out.message
    assert out.message.startswith("127.0.0.1:18001: apply restart m@llm failed")


async def test_refused_connections_are_retried_at_most_twice(monkeypatch):
    monkeypatch.setattr("actors.proxy.RETRY_BACKOFF", (0.0, 0.0))

    def refuse(r):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    proxy, seen = proxy_with(refuse)
    out = await proxy.apply(APPLY)
    assert not out.success and "connection refused" in out.message
    assert len(seen) == 3


async def test_a_retry_that_gets_through_succeeds(monkeypatch):
    monkeypatch.setattr("actors.proxy.RETRY_BACKOFF", (0.0, 0.0))
    answers = iter([httpx.ConnectTimeout("slow"), httpx.Response(200, content=b"null")])

    def flaky(r):
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    proxy, seen = proxy_with(flaky)
    out = await proxy.startup(STARTUP)
    assert out.success and len(seen) == 2
    assert "startup m2@llm succeeded" in out.message


@pytest.mark.parametrize(
    "exc", [httpx.ReadTimeout("t"), httpx.RemoteProtocolError("Server disconnected"), httpx.ReadError("reset")]
)
async def test_a_request_that_may_have_arrived_is_never_resent(exc):
    def fail(r):
        raise exc

    proxy, seen = proxy_with(fail)
    out = await proxy.apply(APPLY)
    assert not out.success and len(seen) == 1


async def test_timeouts_are_per_operation():
    timeouts = Timeouts(apply=7, startup=11, shutdown=13, supports=17, connect=2)
    got: dict[str, dict] = {}

    def record(r: httpx.Request) -> httpx.Response:
        got[r.url.path] = r.extensions["timeout"]
        if r.url.path.endswith("supports"):
            return httpx.Response(200, json=[])
        if r.url.path.endswith("apply"):
            return httpx.Response(200, json={"message": "ok"})
        return httpx.Response(200, content=b"null")

    proxy, _ = proxy_with(record, timeouts=timeouts)
    await proxy.apply(APPLY)
    await proxy.startup(STARTUP)
    await proxy.shutdown(STARTUP)
    await proxy.supports()
    assert got["/api/worker/apply"] == {"connect": 2, "read": 7, "write": 7, "pool": 7}
    assert got["/api/worker/models/startup"]["read"] == 11
    assert got["/api/worker/models/shutdown"]["read"] == 13
    assert got["/api/worker/models/supports"]["read"] == 17


async def test_supports_failure_is_an_outcome_with_the_reason():
    proxy, _ = proxy_with(lambda r: httpx.Response(200, json=[{"host": "x"}]))
    outcome = await proxy.supports()
    assert outcome.models == [] and "not a list of WorkerSupportedModel" in outcome.error


async def test_configured_headers_are_sent():
    proxy, seen = proxy_with(lambda r: httpx.Response(200, json={"message": "ok"}), headers={"X-Fleet": "a"})
    await proxy.apply(APPLY)
    assert seen[0].headers["X-Fleet"] == "a"


async def test_unreachable_worker_fails_fast_without_sending():
    changes = []
    proxy, seen = proxy_with(
        lambda r: httpx.Response(200, json={"message": "ok"}),
        probe=ProbeSettings(enabled=False, failures_to_dead=2),
        on_probe_change=lambda ep, st: changes.append(st.reachable),
    )
    await proxy._record_probe(None)
    await proxy._record_probe("Connection refused")
    assert (await proxy.probe_state()).reachable is True  # one failure is not death
    await proxy._record_probe("Connection refused")
    out = await proxy.apply(APPLY)
    assert not out.success and "unreachable" in out.message and "Connection refused" in out.message
    assert seen == []
    await proxy._record_probe(None)  # the worker came back
    assert (await proxy.apply(APPLY)).success
    assert changes == [True, False, True]



def test_idle_connections_expire_before_a_uvicorn_servers_keepalive_does():
    # uvicorn closes idle connections after 5 s; a request written onto a
    # connection it is closing fails in a way that must not be retried.
    from coordinator.plumbing.transport import client_limits

    assert client_limits().keepalive_expiry < 5


async def test_a_request_sent_as_json_text_goes_out_unchanged():
    proxy, seen = proxy_with(lambda r: httpx.Response(200, json={"message": "ok"}))
    out = await proxy.apply(APPLY.model_dump_json())
    assert out.success
    assert seen[0].content == APPLY.model_dump_json().encode()
    assert seen[0].headers["content-type"] == "application/json"
    again = await proxy.apply(APPLY)  # the model itself works as well, with the same body
    assert again.success and seen[1].content == seen[0].content


async def test_the_callers_deadline_bounds_the_worker_call_whatever_the_operation_timeout():
    """The caller's deadline travels to the proxy: a worker that never answers
    is given up on within the budget, not the operation's 300 s."""
    import asyncio
    import time

    done = asyncio.Event()

    async def silent(reader, writer):
        await reader.read(65536)
        await done.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = WorkerProxy("127.0.0.1", port, probe=NO_PROBE)
    try:
        started = time.monotonic()
        out = await proxy.apply(APPLY, deadline_at=time.time() + 0.4)
        assert time.monotonic() - started < 5  # liveness: far below the apply timeout
        assert out.success is False and "no answer within 0.4" in out.message
        late = await proxy.apply(APPLY, deadline_at=time.time() - 1)
        assert "not sent: the operation's deadline had passed" in late.message
    finally:
        done.set()
        await proxy.close()
        server.close()


def raising(exc: Exception):
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


async def test_a_pool_timeout_is_never_sent_so_it_is_resent():
    proxy, seen = proxy_with(raising(httpx.PoolTimeout("no connection free")))
    out = await proxy.apply(APPLY)
    assert len(seen) == 3  # resent twice: it never left
    assert "no connection to the worker free" in out.message and "never sent" in out.message


async def test_a_tls_verification_failure_says_so_and_is_not_resent():
    import ssl

    failure = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    failure.__cause__ = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    proxy, seen = proxy_with(raising(failure))
    out = await proxy.apply(APPLY)
    assert len(seen) == 1  # resending would fail the same way
    assert "TLS handshake failed" in out.message and "CERTIFICATE_VERIFY_FAILED" in out.message
    assert "connection refused" not in out.message
