"""The one configuration model, built on the driver and handed to every actor.

Load it with :meth:`CoordinatorConfig.from_file` (YAML or JSON) or build it in
Python; either way a mistake raises ``pydantic.ValidationError`` naming the field,
before anything starts::

    registries:
      - kind: embedded            # the registry this project serves itself
        port: 8000
      - kind: dbgpt               # an existing DB-GPT controller (or several, HA)
        urls: ["http://10.0.0.5:8000"]
      - kind: static              # a fixed list, re-read when the file changes
        path: instances.yaml
    timeouts: {apply: 300, startup: 900}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from coordinator.models import ModelInstance

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class _Strict(BaseModel):
    # A typo in a config key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Seconds allowed for each kind of worker call."""

    connect: float = Field(5.0, gt=0)
    apply: float = Field(300.0, gt=0)
    startup: float = Field(900.0, gt=0)  # loading a large model takes minutes
    shutdown: float = Field(120.0, gt=0)
    supports: float = Field(30.0, gt=0)
    #: In a rolling apply, how long a batch has to come back healthy.
    rollout_health: float = Field(300.0, gt=0)

    def for_operation(self, op: str) -> float:
        return float(getattr(self, op))


class ProbeSettings(_Strict):
    """How a proxy checks that its worker still answers."""

    enabled: bool = True
    interval: float = Field(1.0, gt=0)
    timeout: float = Field(1.0, gt=0)
    failures_to_dead: int = Field(2, ge=1)


class BackoffSettings(_Strict):
    """How a watcher retries a registry that fails."""

    initial: float = Field(0.5, gt=0)
    maximum: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.maximum < self.initial:
            raise ValueError("backoff.maximum must be >= backoff.initial")
        return self

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row."""
        return min(self.maximum, self.initial * 2 ** max(0, failures - 1))


class PlacementSettings(_Strict):
    """Where the actors run on a multi-node Ray cluster."""

    #: The coordinator, its watchers and embedded registries run on the head node.
    on_head: bool = True
    #: A proxy prefers the Ray node whose IP is its worker's host.
    colocate_proxies: bool = True
    #: Worker host -> a custom resource of the node its proxy should prefer; for
    #: hosts whose Ray node has another address, or raylets that share an IP.
    host_resources: dict[str, str] = Field(default_factory=dict)


class _Source(_Strict):
    name: str | None = Field(None, pattern=_NAME)


class DbgptSource(_Source):
    """A DB-GPT model controller, polled over its HTTP API.

    Several URLs are replicas of one controller (DB-GPT's HA mode): the first that
    answers is used.
    """

    kind: Literal["dbgpt"] = "dbgpt"
    url: AnyHttpUrl | None = None
    urls: list[AnyHttpUrl] = Field(default_factory=list)
    poll_interval: float = Field(1.0, gt=0)
    request_timeout: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _one_or_more_urls(self) -> Self:
        if self.url is None and not self.urls:
            raise ValueError("a dbgpt source needs 'url' or 'urls'")
        return self

    @property
    def controller_urls(self) -> list[str]:
        urls = ([self.url] if self.url is not None else []) + list(self.urls)
        return [str(u).rstrip("/") for u in urls]


class EmbeddedSource(_Source):
    """The registry this project serves itself (a Ray actor with DB-GPT's
    controller HTTP API). Port 0 picks a free port on first start."""

    kind: Literal["embedded"] = "embedded"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    heartbeat_interval: float = Field(5.0, gt=0)
    #: DB-GPT's own controller uses 60 s. Do not go below ~30 s with DB-GPT
    #: workers: a DB-GPT 0.8.2 worker manager heartbeats its ``WorkerManager@service``
    #: entry every 20 s whatever its configured interval, so a shorter timeout
    #: makes it flap. (Dead workers are noticed in seconds by the proxies' probes,
    #: not by this timeout.)
    heartbeat_timeout: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _timeout_exceeds_interval(self) -> Self:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")
        return self


class StaticSource(_Source):
    """A fixed list of instances, inline or in a YAML/JSON file that is re-read
    when it changes."""

    kind: Literal["static"] = "static"
    instances: list[ModelInstance] | None = None
    path: Path | None = None
    poll_interval: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.instances is None) == (self.path is None):
            raise ValueError("a static source needs exactly one of 'instances' or 'path'")
        return self


RegistrySource = Annotated[DbgptSource | EmbeddedSource | StaticSource, Field(discriminator="kind")]


class CoordinatorConfig(_Strict):
    registries: list[RegistrySource] = Field(min_length=1)
    timeouts: Timeouts = Timeouts()
    probe: ProbeSettings = ProbeSettings()
    backoff: BackoffSettings = BackoffSettings()
    placement: PlacementSettings = PlacementSettings()
    #: Extra headers sent with every worker call.
    headers: dict[str, str] = Field(default_factory=dict)
    #: How long a watcher long poll waits before answering "nothing new".
    long_poll_timeout: float = Field(10.0, gt=0)

    @field_validator("registries", mode="after")
    @classmethod
    def _name_sources(cls, sources: list[RegistrySource]) -> list[RegistrySource]:
        named = [
            s if s.name else s.model_copy(update={"name": f"{s.kind}-{i}"})
            for i, s in enumerate(sources)
        ]
        names = [s.name for s in named]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"registry source names must be unique; repeated: {dupes}")
        return named

    @classmethod
    def from_file(cls, path: str | Path) -> CoordinatorConfig:
        """Load from YAML or JSON (JSON is YAML). Relative static paths are taken
        relative to the file."""
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        for source in data.get("registries") or []:
            if isinstance(source, dict) and source.get("path"):
                source["path"] = str((path.parent / source["path"]).resolve())
        return cls.model_validate(data)

    def source(self, name: str) -> RegistrySource:
        for s in self.registries:
            if s.name == name:
                return s
        raise KeyError(name)


def load_instances_file(path: Path) -> list[ModelInstance]:
    """Parse a static source's file: a list of instances, or ``{instances: [...]}``."""
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict):
        data = data.get("instances")
    return _INSTANCES.validate_python(data or [])


_INSTANCES = TypeAdapter(list[ModelInstance])
