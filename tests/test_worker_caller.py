"""The inference hop's HTTP (coordinator/driver/caller.py), against real
servers on loopback: what never left is *never sent* (and may go elsewhere),
anything after the request was written is *maybe received* (never resent) —
the distinction httpx-aiohttp's transport loses, checked here on the worker
that reads a request and drops the connection."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from coordinator.core.config import CoordinatorConfig
from coordinator.core.inference import ModelOutput, Route
from coordinator.driver.caller import MaybeReceived, NeverSent, WorkerCaller, classify
from tests.conftest import free_port
from tests.test_worker_access import https_worker, pki  # noqa: F401 - the fixtures

CHAT = {"model": "chat", "messages": [{"role": "human", "content": "hi"}]}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def caller_for(workers: dict | None = None, read_timeout: float = 30, **extra) -> WorkerCaller:
    source = {"kind": "static", "name": "s", "instances": [], **({"workers": workers} if workers else {})}
    return WorkerCaller(CoordinatorConfig.model_validate({"registries": [source], **extra}), read_timeout)


def route(port: int) -> Route:
    return Route("chat@llm", "127.0.0.1", port, 1.0, ("s",))


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One HTTP request, headers and body (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


class RawServer:
    """A loopback server whose every connection runs ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler, self.requests = handler, []

    async def __aenter__(self) -> RawServer:
        async def serve(reader, writer):
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()
        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
CHUNK = b'{"text": "a", "error_code": 0}\0'


async def take(stream: AsyncIterator[ModelOutput]) -> list[ModelOutput]:
    return [output async for output in stream]


# ---- the mapping, case by case -------------------------------------------


@pytest.mark.parametrize("exc, outcome, words", [
    (aiohttp.ConnectionTimeoutError(), NeverSent, "connect timed out after 3 s"),
    (aiohttp.SocketTimeoutError(), MaybeReceived, "no answer within 30 s"),
    (aiohttp.ServerDisconnectedError(), MaybeReceived, "connection lost mid-call (Server disconnected)"),
    (aiohttp.ClientOSError(104, "Connection reset by peer"), MaybeReceived, "Connection reset by peer"),
    (aiohttp.ClientPayloadError(), MaybeReceived, "answer cut short (ClientPayloadError)"),
    # aiohttp's words for a request it could not write out whole: no server acted on it
    (aiohttp.ClientOSError(32, "Can not write request body for http://127.0.0.1:1/api/worker/generate"),
     NeverSent, "connection closed before the request was written"),
])
def test_each_failure_maps_to_never_sent_only_when_no_connection_was_made(exc, outcome, words):
    failure = classify(exc, read_timeout=30, connect_timeout=3)
    assert type(failure) is outcome and words in str(failure)


@pytest.mark.anyio
async def test_a_port_nothing_listens_on_is_never_sent():
    caller = caller_for()
    with pytest.raises(NeverSent, match="connection refused"):
        await caller.call(route(free_port()), "POST", "/generate", json=CHAT)
    with pytest.raises(NeverSent, match="connection refused"):
        await take(caller.stream(route(free_port()), "/generate_stream", CHAT))
    await caller.aclose()


@pytest.mark.anyio
async def test_a_worker_that_reads_the_request_and_drops_the_connection_may_have_received_it():
    async def read_and_drop(reader, writer):
        await read_request(reader)

    caller = caller_for()
    async with RawServer(read_and_drop) as server:
        with pytest.raises(MaybeReceived, match="connection lost mid-call"):
            await caller.call(route(server.port), "POST", "/generate", json=CHAT)
        with pytest.raises(MaybeReceived, match="stream broken after 0 chunks"):
            await take(caller.stream(route(server.port), "/generate_stream", CHAT))
    await caller.aclose()


@pytest.mark.anyio
async def test_a_stream_cut_midway_says_how_far_it_got():
    async def two_then_drop(reader, writer):
        await read_request(reader)
        writer.write(STREAM_HEAD + chunked(CHUNK, CHUNK))
        await writer.drain()

    caller = caller_for()
    got: list[ModelOutput] = []
    async with RawServer(two_then_drop) as server:
        with pytest.raises(MaybeReceived, match="stream broken after 2 chunks"):
            async for output in caller.stream(route(server.port), "/generate_stream", CHAT):
                got.append(output)
    assert [o.text for o in got] == ["a", "a"]
    await caller.aclose()


@pytest.mark.anyio
async def test_silence_past_the_read_timeout_may_have_been_received():
    async def silent(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    caller = caller_for(read_timeout=0.3)
    async with RawServer(silent) as server:
        with pytest.raises(MaybeReceived, match="no answer within 0.3 s"):
            await caller.call(route(server.port), "POST", "/generate", json=CHAT)
    await caller.aclose()


@pytest.mark.anyio
async def test_a_worker_that_stops_reading_a_large_request_times_out_as_maybe_received():
    """Writing the request out counts against the read timeout too (a stalled
    worker leaves it half written), as httpx's write timeout did."""
    async def never_reads(reader, writer):
        await asyncio.sleep(10)

    caller = caller_for(read_timeout=0.5)
    big = {**CHAT, "messages": [{"role": "human", "content": "x" * 8_000_000}]}
    async with RawServer(never_reads) as server:
        with pytest.raises(MaybeReceived, match="no answer within 0.5 s"):
            await asyncio.wait_for(caller.call(route(server.port), "POST", "/generate", json=big), 10)
    await caller.aclose()


@pytest.mark.anyio
async def test_a_stream_closed_early_gives_its_connection_back():
    async def streams(reader, writer):
        await read_request(reader)
        writer.write(STREAM_HEAD + chunked(CHUNK))
        await writer.drain()
        await asyncio.sleep(10)

    caller = caller_for(caller={"max_connections_per_worker": 1, "pool_timeout": 0.5})
    async with RawServer(streams) as server:
        for _ in range(3):  # each would find the one connection taken if the last had kept it
            stream = caller.stream(route(server.port), "/generate_stream", CHAT)
            assert (await anext(stream)).text == "a"
            await stream.aclose()
    await caller.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("answer, words", [
    (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 11\r\n\r\nmodel crash", "HTTP 500: model crash"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", "answer is not JSON: 'hello'"),
])
async def test_an_error_status_or_an_unreadable_answer_is_never_resent(answer, words):
    async def reply(reader, writer):
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    caller = caller_for()
    async with RawServer(reply) as server:
        with pytest.raises(MaybeReceived, match=words):
            await caller.call(route(server.port), "POST", "/generate", json=CHAT)
    await caller.aclose()


@pytest.mark.anyio
async def test_the_sources_headers_and_token_are_sent(monkeypatch):
    monkeypatch.setenv("FLEET_TOKEN", "tok-1")
    seen: list[bytes] = []

    async def record(reader, writer):
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n7")
        await writer.drain()

    caller = caller_for({"token": {"env": "FLEET_TOKEN"}, "headers": {"X-Fleet": "prod"}}, headers={"X-Global": "1"})
    async with RawServer(record) as server:
        assert await caller.call(route(server.port), "POST", "/count_token", json={"prompt": "x"}) == 7
    await caller.aclose()
    head = seen[0].lower()
    assert b"accept-encoding" not in head  # answers are read as they come: never asked compressed
    assert b"authorization: bearer tok-1" in head and b"x-fleet: prod" in head and b"x-global: 1" in head
    assert seen[0].startswith(b"POST /api/worker/count_token HTTP/1.1")


@pytest.mark.anyio
async def test_equal_access_settings_share_a_workers_connections_and_changed_ones_get_their_own():
    """Sources s and u give the same settings (two equal objects), t others:
    a worker listed by s, by u, or by s and t (s comes first) is called over
    one kept-open connection; listed by t alone it gets a session, and a
    connection, of its own with t's headers."""
    connections: list[list[bytes]] = []

    async def keep_open(reader, writer):
        heads = []
        connections.append(heads)
        while True:
            try:
                heads.append(await read_request(reader))
            except asyncio.IncompleteReadError:  # the caller closed it
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n7")
            await writer.drain()

    def source(name: str, fleet: str) -> dict:
        return {"kind": "static", "name": name, "instances": [], "workers": {"headers": {"X-Fleet": fleet}}}

    caller = WorkerCaller(CoordinatorConfig.model_validate(
        {"registries": [source("s", "a"), source("t", "b"), source("u", "a")]}), read_timeout=30)
    listings = [("s",), ("u",), ("s", "t"), ("t",), ("u",), ("t",)]
    async with RawServer(keep_open) as server:
        for sources in listings:
            listed = Route("chat@llm", "127.0.0.1", server.port, 1.0, sources)
            assert await caller.call(listed, "POST", "/count_token", json={}) == 7
        await caller.aclose()
    fleets = [[h.lower().split(b"x-fleet: ")[1][:1] for h in heads] for heads in connections]
    assert fleets == [[b"a", b"a", b"a", b"a"], [b"b", b"b"]]


# ---- TLS, against a reference worker that asks for a client certificate ---


@pytest.mark.anyio
async def test_streams_over_mutual_tls_and_a_certificate_it_does_not_trust_is_refused(https_worker, pki):  # noqa: F811
    trusted = caller_for({"tls": {"ca_bundle": str(pki["ca"]), "client_cert": str(pki["client"])}})
    chat = {**CHAT, "model": "chatgpt-test"}  # the model that worker serves
    outputs = await take(trusted.stream(route(https_worker.port), "/generate_stream", chat))
    assert outputs and all(o.error_code == 0 for o in outputs)
    await trusted.aclose()
    stranger = caller_for({"tls": {"ca_bundle": str(pki["stranger_ca"]), "client_cert": str(pki["client"])}})
    with pytest.raises(MaybeReceived, match="TLS handshake failed"):  # not resent: it would fail the same way
        await take(stranger.stream(route(https_worker.port), "/generate_stream", chat))
    await stranger.aclose()


# ---- loops that end without aclose ---------------------------------------


def test_sessions_of_a_loop_that_ended_are_let_go_quietly(caplog):
    """A driver's ``asyncio.run`` that returns without closing: the next loop
    lets the old sessions go, and nothing logs "Unclosed client session"."""
    async def answer(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n3")
        await writer.drain()

    async def once(caller: WorkerCaller) -> int:
        async with RawServer(answer) as server:
            return await caller.call(route(server.port), "POST", "/count_token", json={})

    caplog.set_level(logging.DEBUG, logger="asyncio")
    caller = caller_for()
    assert [asyncio.run(once(caller)) for _ in range(3)] == [3, 3, 3]
    assert len(caller._sessions) == 1  # the two ended loops were let go
    del caller
    gc.collect()
    assert "Unclosed" not in caplog.text
