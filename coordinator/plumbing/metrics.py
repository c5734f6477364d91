"""Metrics, exported through Ray's Prometheus endpoint (every node's
``--metrics-export-port``; Ray prefixes each name with ``ray_``).

| name | kind | tags |
|---|---|---|
| coordinator_operations_total | counter | operation, outcome (success / failure / error / busy) |
| coordinator_queued_operations | gauge | model (a model@type: distinct operations waiting for it) |
| coordinator_instance_operation_seconds | histogram | operation |
| coordinator_live_instances | gauge | model, health (healthy / unhealthy / unreachable) |
| coordinator_watcher_stale | gauge (0/1) | source |
| coordinator_watcher_errors_total | counter | source |
| coordinator_probe_failures_total | counter | (none: the fleet's failed probes) |
| coordinator_probe_failing | gauge | endpoint (failed probes in a row; 0 while it answers) |
| coordinator_watcher_refused_entries | gauge | source |
| coordinator_deployment_replicas | gauge | deployment (model@type), kind (desired / ready) |
| coordinator_deployment_failing | gauge (0/1) | deployment (starts or a params update failing, backing off) |
| coordinator_reconcile_actions_total | counter | action (start / stop / update_params), outcome (success / fallback / failure) |
| coordinator_in_flight | gauge | model (requests in flight, summed over the callers that report) |
| coordinator_draining | gauge | model (instances being drained before an operation) |
| coordinator_waiting | gauge | model (requests waiting: held for want of an instance, scaling from zero, or queued by flow control) |
| coordinator_loop_restarts_total | counter | loop (follow SOURCE / resync / gauges / deployments; a watcher's or registry's loops) |
| coordinator_gateway_requests_total | counter | model, outcome (success / http_4xx / http_5xx / broken / worker_error / deadline / cancelled) |
| coordinator_gateway_time_to_first_token_seconds | histogram | model, instance |
| coordinator_gateway_request_seconds | histogram | model, instance |
| coordinator_gateway_in_flight | gauge | replica |
| coordinator_gateway_routing_decisions_total | counter | model, reason (prefix_hit / load / hot_spot / random) |
| coordinator_gateway_flow_queued | gauge | tenant, replica (requests waiting for a place under flow control) |
| coordinator_gateway_flow_refused_total | counter | tenant, reason (queue_full / displaced / deadline / tenant_limit) |

The code that records them takes a :class:`Metrics`; :class:`NoMetrics` (the
default) does nothing, so the logic stays testable without Ray, and
:func:`ray_metrics` builds the real ones inside an actor.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900]


class Metrics(Protocol):
    def operation(self, operation: str, outcome: str) -> None: ...

    def instance_latency(self, operation: str, seconds: float) -> None: ...

    def live_instances(self, counts: dict[tuple[str, str], int], models: set[str] | None = None) -> None:
        """Non-zero counts by (model, health) for ``models`` (every model when
        None); a label of those models missing from ``counts`` reads 0."""
        ...

    def queued_operations(self, key: str, depth: int) -> None: ...

    def watcher(self, source: str, stale: bool, failed: bool) -> None: ...

    def probe(self, endpoint: str, failures_in_a_row: int) -> None:
        """After every probe (so the gauge is re-reported while the proxy lives)."""
        ...

    def refused_entries(self, source: str, count: int) -> None: ...

    def deployment(self, key: str, desired: int, ready: int, failing: bool, present: bool = True) -> None:
        """After every reconcile round; ``present=False`` when it was undeployed."""
        ...

    def reconcile_action(self, action: str, outcome: str) -> None: ...

    def loop_restart(self, loop: str) -> None: ...

    def in_flight(self, by_model: dict[str, int]) -> None:
        """Requests in flight per model@type, over the callers that report."""
        ...

    def draining(self, by_model: dict[str, int]) -> None:
        """Instances being drained per model@type."""
        ...

    def waiting(self, by_model: dict[str, int]) -> None:
        """Requests held for want of an instance, per model@type."""
        ...


class NoMetrics:
    def operation(self, operation: str, outcome: str) -> None:
        pass

    def instance_latency(self, operation: str, seconds: float) -> None:
        pass

    def live_instances(self, counts: dict[tuple[str, str], int], models: set[str] | None = None) -> None:
        pass

    def queued_operations(self, key: str, depth: int) -> None:
        pass

    def watcher(self, source: str, stale: bool, failed: bool) -> None:
        pass

    def probe(self, endpoint: str, failures_in_a_row: int) -> None:
        pass

    def refused_entries(self, source: str, count: int) -> None:
        pass

    def deployment(self, key: str, desired: int, ready: int, failing: bool, present: bool = True) -> None:
        pass

    def reconcile_action(self, action: str, outcome: str) -> None:
        pass

    def loop_restart(self, loop: str) -> None:
        pass

    def in_flight(self, by_model: dict[str, int]) -> None:
        pass

    def draining(self, by_model: dict[str, int]) -> None:
        pass

    def waiting(self, by_model: dict[str, int]) -> None:
        pass


class RayMetrics:
    def __init__(self) -> None:
        from ray.util import metrics

        self._ops = metrics.Counter(
            "coordinator_operations_total", "Operations by kind and outcome", tag_keys=("operation", "outcome"))
        self._latency = metrics.Histogram(
            "coordinator_instance_operation_seconds", "Per-instance operation latency",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("operation",))
        self._live = metrics.Gauge(
            "coordinator_live_instances", "Live instances by model and health", tag_keys=("model", "health"))
        self._queued = metrics.Gauge(
            "coordinator_queued_operations", "Distinct operations waiting for a model", tag_keys=("model",))
        self._stale = metrics.Gauge("coordinator_watcher_stale", "1 while a watcher's snapshot is stale",
                                    tag_keys=("source",))
        self._watch_errors = metrics.Counter(
            "coordinator_watcher_errors_total", "Failed registry fetches", tag_keys=("source",))
        # Per endpoint, a gauge: Ray's metrics agent drops a gauge series that
        # stops being reported (a retired endpoint's), but keeps every counter
        # series it has seen, so a counter tagged by endpoint would grow with
        # every worker that ever came and went.
        self._probe_failures = metrics.Counter("coordinator_probe_failures_total", "Failed worker probes")
        self._probe_failing = metrics.Gauge(
            "coordinator_probe_failing", "Failed probes in a row, by endpoint", tag_keys=("endpoint",))
        self._refused = metrics.Gauge(
            "coordinator_watcher_refused_entries", "Invalid registry entries in a source's last listing",
            tag_keys=("source",))
        self._replicas = metrics.Gauge(
            "coordinator_deployment_replicas", "Desired and ready replicas of a deployment",
            tag_keys=("deployment", "kind"))
        self._failing = metrics.Gauge(
            "coordinator_deployment_failing", "1 while a deployment's starts or update fail", tag_keys=("deployment",))
        self._actions = metrics.Counter(
            "coordinator_reconcile_actions_total", "Reconcile actions by kind and outcome",
            tag_keys=("action", "outcome"))
        self._restarts = metrics.Counter(
            "coordinator_loop_restarts_total", "Background loops restarted after an unexpected failure",
            tag_keys=("loop",))
        self._in_flight = metrics.Gauge(
            "coordinator_in_flight", "Requests in flight per model, summed over the callers that report",
            tag_keys=("model",))
        self._draining = metrics.Gauge(
            "coordinator_draining", "Instances being drained before an operation, per model", tag_keys=("model",))
        self._waiting = metrics.Gauge(
            "coordinator_waiting", "Requests waiting per model: held for an instance (scaling from zero) or queued "
            "by flow control",
            tag_keys=("model",))
        self._live_labels: dict[str, set[str]] = {}  # health labels recorded non-zero, by model

    def operation(self, operation: str, outcome: str) -> None:
        self._ops.inc(1, {"operation": operation, "outcome": outcome})

    def instance_latency(self, operation: str, seconds: float) -> None:
        self._latency.observe(seconds, {"operation": operation})

    def live_instances(self, counts: dict[tuple[str, str], int], models: set[str] | None = None) -> None:
        fresh: dict[str, set[str]] = {}
        for (model, health), n in counts.items():
            self._live.set(n, {"model": model, "health": health})
            fresh.setdefault(model, set()).add(health)
        for model in list(self._live_labels) if models is None else models:
            # a label (or a model) that went away reads 0, not its last value
            for health in self._live_labels.pop(model, set()) - fresh.get(model, set()):
                self._live.set(0, {"model": model, "health": health})
        self._live_labels.update(fresh)

    def queued_operations(self, key: str, depth: int) -> None:
        self._queued.set(depth, {"model": key})

    def watcher(self, source: str, stale: bool, failed: bool) -> None:
        self._stale.set(1 if stale else 0, {"source": source})
        if failed:
            self._watch_errors.inc(1, {"source": source})

    def probe(self, endpoint: str, failures_in_a_row: int) -> None:
        if failures_in_a_row:
            self._probe_failures.inc(1)
        self._probe_failing.set(failures_in_a_row, {"endpoint": endpoint})

    def refused_entries(self, source: str, count: int) -> None:
        self._refused.set(count, {"source": source})

    def deployment(self, key: str, desired: int, ready: int, failing: bool, present: bool = True) -> None:
        # An undeployed model reads 0 (a gauge keeps its last value otherwise).
        self._replicas.set(desired if present else 0, {"deployment": key, "kind": "desired"})
        self._replicas.set(ready if present else 0, {"deployment": key, "kind": "ready"})
        self._failing.set(1 if failing and present else 0, {"deployment": key})

    def reconcile_action(self, action: str, outcome: str) -> None:
        self._actions.inc(1, {"action": action, "outcome": outcome})

    def loop_restart(self, loop: str) -> None:
        self._restarts.inc(1, {"loop": loop})

    def in_flight(self, by_model: dict[str, int]) -> None:
        for model, n in by_model.items():
            self._in_flight.set(n, {"model": model})

    def draining(self, by_model: dict[str, int]) -> None:
        for model, n in by_model.items():
            self._draining.set(n, {"model": model})

    def waiting(self, by_model: dict[str, int]) -> None:
        for model, n in by_model.items():
            self._waiting.set(n, {"model": model})


def live_counts(models_and_health: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    return dict(Counter(models_and_health))


#: Seconds, for the gateway's time to first token and request duration.
GATEWAY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]


class NoGatewayMetrics:
    def request(self, model: str, instance: str, outcome: str, seconds: float) -> None:
        pass

    def first_token(self, model: str, instance: str, seconds: float) -> None:
        pass

    def in_flight(self, count: int) -> None:
        pass

    def decision(self, model: str, reason: str) -> None:
        pass

    def flow_queued(self, tenant: str, count: int) -> None:
        pass

    def flow_refused(self, tenant: str, reason: str) -> None:
        pass


class GatewayMetrics(NoGatewayMetrics):
    """The gateway's metrics (the estimated prefix hit rate is
    ``prefix_hit`` decisions over all decisions of a model)."""

    def __init__(self, replica: int) -> None:
        from ray.util import metrics

        self._replica = str(replica)
        self._requests = metrics.Counter("coordinator_gateway_requests_total", "Gateway requests by outcome",
                                         tag_keys=("model", "outcome"))
        self._ttft = metrics.Histogram("coordinator_gateway_time_to_first_token_seconds",
                                       "Gateway: request arrival to the worker's first output",
                                       boundaries=GATEWAY_BOUNDARIES, tag_keys=("model", "instance"))
        self._duration = metrics.Histogram("coordinator_gateway_request_seconds", "Gateway request duration",
                                           boundaries=GATEWAY_BOUNDARIES, tag_keys=("model", "instance"))
        self._in_flight = metrics.Gauge("coordinator_gateway_in_flight", "Requests a gateway replica holds",
                                        tag_keys=("replica",))
        self._decisions = metrics.Counter("coordinator_gateway_routing_decisions_total",
                                          "Routing decisions by reason", tag_keys=("model", "reason"))
        self._flow_queued = metrics.Gauge("coordinator_gateway_flow_queued",
                                          "Requests waiting for a place under flow control, by tenant",
                                          tag_keys=("tenant", "replica"))
        self._flow_refused = metrics.Counter("coordinator_gateway_flow_refused_total",
                                             "Requests flow control answered 429, by tenant and reason",
                                             tag_keys=("tenant", "reason"))

    def request(self, model: str, instance: str, outcome: str, seconds: float) -> None:
        self._requests.inc(1, {"model": model, "outcome": outcome})
        if instance:
            self._duration.observe(seconds, {"model": model, "instance": instance})

    def first_token(self, model: str, instance: str, seconds: float) -> None:
        self._ttft.observe(seconds, {"model": model, "instance": instance})

    def in_flight(self, count: int) -> None:
        self._in_flight.set(count, {"replica": self._replica})

    def decision(self, model: str, reason: str) -> None:
        self._decisions.inc(1, {"model": model, "reason": reason})

    def flow_queued(self, tenant: str, count: int) -> None:
        self._flow_queued.set(count, {"tenant": tenant, "replica": self._replica})

    def flow_refused(self, tenant: str, reason: str) -> None:
        self._flow_refused.inc(1, {"tenant": tenant, "reason": reason})
