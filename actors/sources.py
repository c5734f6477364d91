"""Where a watcher gets instances from. Each source answers one question,
:meth:`Source.next`: "wait until you may have something new, then tell me" —
the full instance list (screened: entries that are not valid instances are
dropped and described), or the source's own change (a delta or snapshot from
the embedded registry), or ``None`` for "I am alive and nothing changed", or
:class:`SourceError` when it could not answer. The watcher does the rest
(versions, staleness, backoff).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

import httpx
import yaml

from coordinator.plumbing.transport import WorkerCallError, client_limits, map_transport_errors, read_json
from coordinator.core.changes import Change
from coordinator.core.config import DbgptSource, EmbeddedSource, RegistrySource, StaticSource, read_instances_file
from coordinator.core.liveset import Screened, require_some, screen_entry, screen_listing
from coordinator.core.models import ModelInstance


class SourceError(Exception):
    pass


class Source(Protocol):
    target: str

    async def next(self, first: bool) -> Screened | Change | None:
        """``first`` asks for an answer now (first call, or a retry after a
        failure) instead of waiting for the next change or poll."""
        ...

    async def close(self) -> None: ...


class DbgptControllerSource:
    """Polls ``GET /api/controller/models`` on a DB-GPT controller. With several
    URLs (replicas), the last one that answered is asked first.

    A DB-GPT controller moves ``last_heartbeat`` on every heartbeat and has no
    way to say what changed, so each poll brings the whole listing. Entries that
    differ from the last poll only in their heartbeat time are passed on as the
    instance already held (heartbeat time and all), without validating them
    again: a heartbeat changes nothing downstream, and the cost of a poll beyond
    reading the JSON is one dict comparison per unchanged entry."""

    def __init__(
        self, settings: DbgptSource, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._settings = settings
        self._urls = settings.controller_urls
        self.target = ", ".join(self._urls)
        self._client = httpx.AsyncClient(
            timeout=settings.request_timeout, transport=transport, limits=client_limits()
        )
        # The last poll's entries, without their heartbeat time, and what they became.
        self._seen: dict[tuple, tuple[dict, ModelInstance]] = {}

    async def next(self, first: bool) -> Screened:
        if not first:
            await asyncio.sleep(self._settings.poll_interval)
        errors = []
        for i, url in enumerate(self._urls):
            try:
                with map_transport_errors(self._settings.request_timeout):
                    response = await self._client.get(f"{url}/api/controller/models")
                listing = self._screen(read_json(response))
            except (WorkerCallError, ValueError) as exc:
                errors.append(f"{url}: {_short(exc)}")
                continue
            if i:  # remember the replica that answered
                self._urls.insert(0, self._urls.pop(i))
            return listing
        raise SourceError("; ".join(errors))

    def _screen(self, raw: object) -> Screened:
        """:func:`screen_listing`, validating only the entries that changed.
        Per unchanged entry: a pop, a lookup and a dict comparison."""
        if not isinstance(raw, list):
            return screen_listing(raw)  # raises, naming what came instead
        seen: dict[object, tuple[dict, ModelInstance]] = {}
        instances, rejected = [], []
        for entry in raw:
            key = held = None
            if isinstance(entry, dict):
                beat = entry.pop("last_heartbeat", None)  # the parsed listing is ours to change
                key = (entry.get("model_name"), entry.get("host"), entry.get("port"))
                try:
                    held = self._seen.get(key)
                except TypeError:  # an unhashable name or host: validation will say why
                    key = None
            if held is not None and held[0] == entry:
                inst = held[1]
            else:
                bare = dict(entry) if key is not None else None
                if isinstance(entry, dict):
                    entry["last_heartbeat"] = beat
                inst = screen_entry(entry)
                if isinstance(inst, str):
                    rejected.append(inst)
                    continue
                held = (bare, inst)
            instances.append(inst)
            if key is not None:
                seen[key] = held
        self._seen = seen
        return require_some(Screened(instances, rejected))

    async def close(self) -> None:
        await self._client.aclose()


class EmbeddedRegistrySource:
    """Long-polls the embedded registry actor: a change arrives as soon as it is
    made. The actor is looked up by name, again after it restarts."""

    def __init__(
        self, settings: EmbeddedSource, actor_name: str, namespace: str, long_poll: float, pace: float = 0.0
    ) -> None:
        self._actor_name, self._namespace = actor_name, namespace
        self._long_poll = long_poll
        self._pace = pace
        self._since: tuple[str, int] | None = None
        self._handle = None
        scheme = "https" if settings.tls else "http"
        self.target = f"ray actor {actor_name!r} ({scheme}://{settings.host}:{settings.port})"

    async def next(self, first: bool) -> Change | None:
        """The registry's change since the last answer (everything when ``first``)."""
        import ray
        from ray.exceptions import RayError

        if not first and self._pace:
            await asyncio.sleep(self._pace)  # a burst of changes shares the next answer
        try:
            if self._handle is None:
                self._handle = ray.get_actor(self._actor_name, namespace=self._namespace)
            ref = self._handle.wait_for_change.remote(None if first else self._since, self._long_poll)
            change = await asyncio.wait_for(ref, self._long_poll + 10)
        except (RayError, ValueError, TimeoutError) as exc:
            self._handle = None
            raise SourceError(f"embedded registry unavailable: {_short(exc)}") from exc
        if change is not None:  # the registry validated its entries
            self._since = (change.epoch, change.version)
        return change

    async def close(self) -> None:
        pass


class StaticFileSource:
    """Instances from the config, or from a file re-read when it changes."""

    def __init__(self, settings: StaticSource) -> None:
        self._settings = settings
        self._seen: tuple[int, int] | None = None
        self.target = str(settings.path) if settings.path else "inline instances"

    async def next(self, first: bool) -> Screened | None:
        path = self._settings.path
        if not first:
            await asyncio.sleep(self._settings.poll_interval)
        if path is None:  # inline: validated with the config
            return Screened(list(self._settings.instances or []), []) if first else None
        try:
            st = path.stat()
            if not first and (st.st_mtime_ns, st.st_size) == self._seen:
                return None
            listing = screen_listing(read_instances_file(Path(path)))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise SourceError(f"cannot read {path}: {_short(exc)}") from exc
        self._seen = (st.st_mtime_ns, st.st_size)
        return listing

    async def close(self) -> None:
        pass


def build_source(
    settings: RegistrySource, registry_actor: str, namespace: str, long_poll: float, pace: float = 0.0
) -> Source:
    if isinstance(settings, DbgptSource):
        return DbgptControllerSource(settings)
    if isinstance(settings, EmbeddedSource):
        return EmbeddedRegistrySource(settings, registry_actor, namespace, long_poll, pace)
    return StaticFileSource(settings)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "…"
