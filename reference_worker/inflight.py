"""The generate requests in flight on each model of one reference worker, so a
model that stops can abort them, as a real engine (vLLM, HF, llama.cpp behind a
DB-GPT worker) aborts every request it is running when it begins to unload."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from typing import Any

from coordinator.core.inference import ModelOutput
from reference_worker.sim import Fault


class ModelStopped(Fault):
    """A request aborted because its model stopped (a Fault: a plain generate
    answers DB-GPT's bare 500)."""


class InFlightRequests:
    """The one place that knows which requests are in flight on which model key."""

    def __init__(self) -> None:
        self._by_model: defaultdict[str, set[_Request]] = defaultdict(set)

    def count(self, key: str) -> int:
        """Requests in flight on model ``key``."""
        return len(self._by_model.get(key, ()))

    def abort(self, key: str) -> int:
        """Abort every request in flight on model ``key`` (and none of another
        model's); how many. Each is marked ``"aborted": True`` in its journal entry."""
        aborted = self._by_model.pop(key, set())
        for request in aborted:
            request.abort()
        return len(aborted)

    async def run(
        self, key: str, outputs: AsyncIterator[ModelOutput], record: dict[str, Any] | None = None
    ) -> AsyncIterator[ModelOutput]:
        """``outputs`` (the model's work on one request) as a request in flight on
        model ``key``: when the model stops, the step under way — waiting for a
        slot, the prefill, a chunk — is cancelled and :class:`ModelStopped` raised.
        Iterate it under ``aclosing`` so the request leaves the registry on time."""
        request = _Request(key, record)
        held = self._by_model[key]
        held.add(request)
        try:
            async with aclosing(outputs):
                while True:
                    with request.abortable():
                        output = await anext(outputs, None)
                    if output is None:
                        return
                    if output.finish_reason is not None:
                        # The engine has made its last output: the request is
                        # finished there, even while that output is on its way.
                        held.discard(request)
                    yield output
        finally:
            held.discard(request)


class _Request:
    """One request in flight. An abort cancels only the model's work on it (a
    step), never its caller's own awaits (sending a chunk on): an abort between
    steps is raised as the next one begins."""

    def __init__(self, key: str, record: dict[str, Any] | None) -> None:
        self.key = key
        self.record = record
        self.aborted = False
        self._working: asyncio.Task[Any] | None = None  # the task inside a step, if any

    def abort(self) -> None:
        self.aborted = True
        if self.record is not None:
            self.record["aborted"] = True
        if self._working is not None:
            self._working.cancel()

    @contextmanager
    def abortable(self) -> Iterator[None]:
        if self.aborted:
            raise self._stopped()
        task = asyncio.current_task()
        assert task is not None
        self._working = task
        try:
            yield
        except asyncio.CancelledError:
            # As asyncio.timeout does: the cancellation is ours alone only if
            # uncancelling leaves none; anyone else's goes on as a cancellation.
            if self.aborted and task.uncancel() == 0:
                raise self._stopped() from None
            raise
        finally:
            self._working = None

    def _stopped(self) -> ModelStopped:
        return ModelStopped(f"{self.key} stopped: request aborted")
