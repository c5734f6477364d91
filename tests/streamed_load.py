"""Long streams through RayWorkerManager (or the gateway's OpenAI API), back
to back, each stream's outcome and times recorded (its first content too:
time to first token); and the reference workers' journals, where a worker
says which calls it aborted or refused. Used by bench/rollout.py,
bench/demand.py and tests/test_zero_loss.py.

With reference workers run as ``--chunks 30 --chunk-delay 0.08``, a stream of
:data:`PROMPT` gets a ~30-word answer, a chunk per word: it lasts ~2.5 s."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

import coordinator
from tests.conftest import wait_until

PROMPT = " ".join(f"w{i}" for i in range(26))
#: Seconds between an idle caller's questions whether it is wanted (``active``):
#: how late it may join a step in the load.
ASK_EVERY = 0.1


@dataclass(frozen=True)
class Stream:
    """One streamed request as its caller saw it."""

    #: Wall-clock seconds (``time.time()``): the clock of the workers' journals.
    began: float
    ended: float
    #: Outputs with content (no error) received before the end.
    chunks: int
    #: The text of the error output it ended with, if it ended with one.
    error: str | None
    finish_reason: str | None
    #: Wall-clock seconds its first content arrived (None: none did).
    first: float | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from the call to its first content: time to first token."""
        return None if self.first is None else self.first - self.began

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason == "stop"

    @property
    def truncated(self) -> bool:
        """Content arrived, then the stream ended unfinished (cut midway)."""
        return not self.ok and self.chunks > 0

    @property
    def failed(self) -> bool:
        """It ended unfinished before any content (refused, nowhere to go)."""
        return not self.ok and self.chunks == 0

    def overlaps(self, begin: float, end: float) -> bool:
        return self.began < end and self.ended > begin


async def stream_once(manager: coordinator.RayWorkerManager, params: dict) -> Stream:
    """One ``generate_stream`` of ``params`` to its end, as its caller saw it."""
    began, chunks, first, last = time.time(), 0, None, None
    async for last in manager.generate_stream(params):
        if last.error_code:
            break
        chunks += 1
        if first is None:
            first = time.time()
    if last is None:
        error, finish_reason = "no output", None
    else:
        error, finish_reason = (last.text if last.error_code else None), last.finish_reason
    return Stream(began, time.time(), chunks, error, finish_reason, first)


async def stream_through_gateway(client: httpx.AsyncClient, model: str, content: str) -> Stream:
    """One streamed chat through the gateway's OpenAI API (``client``'s base
    URL) to its end: an error status, or an OpenAI error event (a stream
    broken midway), is its error."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": content}]}
    began, chunks, first, finish_reason, error = time.time(), 0, None, None, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"].get("message", "error")
                        break
                    choice = event["choices"][0]
                    if choice["delta"].get("content"):
                        chunks += 1
                        first = first or time.time()
                    finish_reason = choice.get("finish_reason") or finish_reason
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return Stream(began, time.time(), chunks, error, finish_reason, first)


class StreamedLoad:
    """``callers`` callers streaming ``model`` back to back from a thread of
    this process (its own event loop and RayWorkerManager — or, with
    ``gateway``, OpenAI's streamed chat at that base URL), every stream
    recorded in :attr:`streams`. A caller whose stream failed waits
    ``pause_after_failure`` before its next one (a model with no instance left
    would otherwise be asked in a tight loop). Caller i starts ``i * spread /
    callers`` seconds in: streams of one length, started together, would stay
    in step — all ending at once, every time — where steady traffic ends
    streams at any moment; a ``spread`` of a stream's length staggers them
    evenly. With ``active``, caller i streams only while ``active(i)`` is
    true (a load that follows a trace: ``active(i)`` is ``i < callers
    wanted now``); told to stop, it finishes its stream first, then asks
    again every :data:`ASK_EVERY` seconds. Used as a context manager: on entry,
    until every caller has finished a stream (with ``active``, at once: the
    callers may not be wanted yet); on exit, the callers finish the stream
    they are in and stop."""

    def __init__(self, cluster: coordinator.Cluster, model: str, callers: int,
                 pause_after_failure: float = 0.0, spread: float = 0.0,
                 active: Callable[[int], bool] | None = None, gateway: str | None = None) -> None:
        self._cluster, self._model, self._callers, self._gateway = cluster, model, callers, gateway
        self._pause_after_failure, self._spread = pause_after_failure, spread
        self._active = active
        self.streams: list[Stream] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        manager = coordinator.RayWorkerManager(self._cluster)
        client = httpx.AsyncClient(base_url=self._gateway or "http://unused", timeout=60)

        async def caller(i: int) -> None:
            await asyncio.sleep(i * self._spread / self._callers)
            while not self._stop.is_set():
                if self._active is not None and not self._active(i):
                    await asyncio.sleep(ASK_EVERY)
                    continue
                content = f"{i} {PROMPT}"
                if self._gateway:
                    stream = await stream_through_gateway(client, self._model, content)
                else:
                    stream = await stream_once(manager, {"model": self._model, "messages": [
                        {"role": "human", "content": content}]})
                self.streams.append(stream)
                if not stream.ok and self._pause_after_failure:
                    await asyncio.sleep(self._pause_after_failure)

        await asyncio.gather(*(caller(i) for i in range(self._callers)))
        await client.aclose()
        await manager.aclose()

    def __enter__(self) -> StreamedLoad:
        self._thread.start()
        if self._active is None:
            wait_until(lambda: len(self.streams) >= self._callers, timeout=30, what="the load running")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def lost(self) -> list[Stream]:
        return [s for s in self.streams if not s.ok]


def journal(port: int) -> list[dict]:
    """A reference worker's journal: every worker call with its arrival ``t``,
    its end ``t_end``, and ``aborted`` / ``refused`` when it was."""
    return httpx.get(f"http://127.0.0.1:{port}/api/_reference/journal", timeout=10).json()


def aborted(ports: Iterable[int]) -> int:
    """Requests the workers aborted because their model stopped under them."""
    return sum(1 for port in ports for entry in journal(port) if entry.get("aborted"))


def refused(ports: Iterable[int]) -> int:
    """Requests the workers refused because their model was not loaded (a
    request that reached a loading or stopped instance)."""
    return sum(1 for port in ports for entry in journal(port) if entry.get("refused"))
