"""What ``Cluster.status()`` reports: every instance with the registry's word and
the proxy's first-hand probe, and every watcher with its freshness."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from coordinator.core.rollout import RolloutProgress
from coordinator.core.supervisor import LoopState


class WatcherStatus(BaseModel):
    source: str  # the source's name in the config
    kind: str  # dbgpt | embedded | static
    target: str  # controller URL(s), registry actor, or file
    version: int = 0
    instances: int = 0
    ready: bool = False  # the source has answered once (until then listeners get nothing, not an empty set)
    stale: bool = False  # the last fetch failed; the snapshot is the last good one
    last_success: float | None = None  # wall-clock seconds
    fetches: int = 0  # answers from the source (polls answered, changes received, "nothing new")
    consecutive_failures: int = 0
    last_error: str | None = None
    #: Entries in the last listing that were refused (not valid instances, so
    #: never dispatched to), and why, for the first few.
    rejected_entries: int = 0
    rejected_examples: list[str] = Field(default_factory=list)


class InstanceStatus(BaseModel):
    model: str
    worker_type: str
    host: str
    port: int
    registry_healthy: bool
    #: The proxy's probe: True reachable, False unreachable, None not probed yet.
    reachable: bool | None
    probe_error: str | None = None
    last_heartbeat: datetime | None = None
    #: Requests in flight on it, summed over the callers (routers, gateway
    #: replicas) that report to the coordinator.
    in_flight: int = 0
    #: Out of the route table while an operation waits for its requests to end.
    draining: bool = False
    #: The registry's weight: routers share load in proportion to it (0: no new requests).
    weight: float = 1.0

    @property
    def healthy(self) -> bool:
        return self.registry_healthy and self.reachable is not False

    @property
    def why_unhealthy(self) -> str | None:
        if self.reachable is False:
            return f"unreachable: {self.probe_error}"
        if not self.registry_healthy:
            return "registry marks it unhealthy"
        return None


class ClusterStatus(BaseModel):
    name: str
    namespace: str
    instances: list[InstanceStatus]
    watchers: list[WatcherStatus]
    proxies: int
    busy_keys: list[str]
    #: Distinct operations waiting per model@type (the one running not counted).
    queued: dict[str, int] = Field(default_factory=dict)
    rollouts: list[RolloutProgress] = Field(default_factory=list)
    #: The coordinator's background loops (following, resync, gauges, keeper).
    loops: list[LoopState] = Field(default_factory=list)
    #: Callers (routers, gateway replicas) whose in-flight reports count now.
    load_reporters: int = 0
    #: Requests waiting per model@type, summed over the callers that report:
    #: held for want of any instance (a model scaling from zero), or queued by
    #: flow control (the gateway's, a process's ``caller.flow``).
    waiting: dict[str, int] = Field(default_factory=dict)
    #: Where the fleet page is served (None: turned off, or not serving yet).
    page_url: str | None = None
