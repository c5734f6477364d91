"""What the fleet page shows: one JSON-ready snapshot built from ``status()``
and the deployments — totals for its header, the models with their
instances, the deployments with their last events, the operations running
and queued, the watchers, and the last errors.

Every time in it is absolute (unix seconds), never an age: a snapshot of a
fleet where nothing happened is equal to the one before it, so the page's
server sends it only when something changed, and the browser works the ages
out itself against ``at``, the coordinator's clock.

Pure: :mod:`coordinator.control.fleet_page` serves it; tests build it from
made-up statuses.
"""

from __future__ import annotations

from typing import Any

from coordinator.core.deployments import DeploymentStatus
from coordinator.core.models import worker_key
from coordinator.core.status import ClusterStatus, InstanceStatus

#: The worker type of the worker managers' own entries (DB-GPT's "WorkerManager@service").
SERVICE = "service"
#: Events shown per deployment, newest first.
EVENTS_SHOWN = 5
#: Errors shown: what is wrong now first, then the most recent failures.
ERRORS_SHOWN = 12


def health(inst: InstanceStatus) -> str:
    """``healthy``, ``unreachable`` (the probes' word), ``unhealthy`` (the
    registry's), or ``unprobed`` (listed healthy, no probe answer yet)."""
    if inst.reachable is False:
        return "unreachable"
    if not inst.registry_healthy:
        return "unhealthy"
    if inst.reachable is None:
        return "unprobed"
    return "healthy"


def _instance(inst: InstanceStatus) -> dict[str, Any]:
    state = health(inst)
    return {
        "endpoint": f"{inst.host}:{inst.port}",
        "health": state,
        "why": inst.why_unhealthy,
        "in_flight": inst.in_flight,
        "draining": inst.draining,
        "weight": inst.weight,
        "last_heartbeat": inst.last_heartbeat.timestamp() if inst.last_heartbeat else None,
    }


def _models(status: ClusterStatus, desired: dict[str, int]) -> list[dict[str, Any]]:
    grouped: dict[str, list[InstanceStatus]] = {}
    for inst in status.instances:
        grouped.setdefault(worker_key(inst.model, inst.worker_type), []).append(inst)
    for key in status.waiting:  # a model with requests waiting for it (scaled to zero, or queued)
        grouped.setdefault(key, [])
    models = []
    for key, insts in grouped.items():
        model, _, worker_type = key.rpartition("@")
        rows = [_instance(i) for i in sorted(insts, key=lambda i: (i.host, i.port))]
        models.append({
            "key": key, "model": model, "worker_type": worker_type, "service": worker_type == SERVICE,
            "instances": rows,
            "total": len(rows),
            "healthy": sum(1 for r in rows if r["health"] == "healthy" and not r["draining"]),
            "in_flight": sum(r["in_flight"] for r in rows),
            "draining": sum(1 for r in rows if r["draining"]),
            "waiting": status.waiting.get(key, 0),
            "desired": desired.get(key),
        })
    # The models first, by name; the worker managers' own entries last.
    return sorted(models, key=lambda m: (m["service"], m["key"]))


def _deployment(st: DeploymentStatus) -> dict[str, Any]:
    return {
        "key": st.key, "model": st.model, "worker_type": st.worker_type,
        "replicas": st.replicas, "ready": st.ready, "state": st.state, "stuck": st.stuck,
        "last_error": st.last_error, "generation": st.generation, "observed_generation": st.observed_generation,
        "events": [e.model_dump() for e in reversed(st.events[-EVENTS_SHOWN:])],
    }


def _watcher(w: Any) -> dict[str, Any]:
    return {
        "source": w.source, "kind": w.kind, "target": w.target, "version": w.version, "instances": w.instances,
        "state": "stale" if w.stale else "fresh" if w.ready else "starting",
        "last_success": w.last_success, "failures": w.consecutive_failures, "last_error": w.last_error,
        "refused": w.rejected_entries,
    }


def _errors(status: ClusterStatus, deployments: list[DeploymentStatus]) -> list[dict[str, Any]]:
    """What is wrong now (``at`` None), then past failures, newest first."""
    now: list[dict[str, Any]] = []
    down: set[str] = set()
    for inst in sorted(status.instances, key=lambda i: (i.host, i.port)):
        endpoint = f"{inst.host}:{inst.port}"
        if inst.reachable is False and endpoint not in down:  # one line per worker, not per model on it
            down.add(endpoint)
            now.append({"at": None, "where": endpoint, "message": f"unreachable: {inst.probe_error}"})
    for w in status.watchers:
        if w.stale:
            now.append({"at": None, "where": f"watcher {w.source}", "message": f"stale: {w.last_error}"})
    for st in deployments:
        if st.state in ("failing", "degraded") and st.last_error:
            now.append({"at": None, "where": st.key, "message": f"{st.state}: {st.last_error}"})
    past = [{"at": e.at, "where": st.key, "message": " ".join(
                filter(None, [e.action, e.endpoint, "failed:", e.message or e.reason]))}
            for st in deployments for e in st.events if not e.ok]
    past += [{"at": loop.last_error_at, "where": f"loop {loop.name}", "message": loop.last_error}
             for loop in status.loops if loop.last_error]
    past.sort(key=lambda e: e["at"] or 0.0, reverse=True)
    return (now + past)[:ERRORS_SHOWN]


def fleet_snapshot(status: ClusterStatus, deployments: list[DeploymentStatus], now: float) -> dict[str, Any]:
    """The page's whole content, as of ``now`` (unix seconds)."""
    desired = {st.key: st.replicas for st in deployments}
    models = _models(status, desired)
    served = [m for m in models if not m["service"]]
    hosts = [m for m in models if m["service"]]
    watchers = [_watcher(w) for w in status.watchers]
    totals = {
        "models": len(served),
        "instances": sum(m["total"] for m in served),
        "healthy": sum(m["healthy"] for m in served),
        "in_flight": sum(m["in_flight"] for m in served),
        "draining": sum(m["draining"] for m in served),
        "waiting": sum(status.waiting.values()),
        "hosts": sum(m["total"] for m in hosts),
        "hosts_healthy": sum(m["healthy"] for m in hosts),
        "deployments": len(deployments),
        "deployments_ready": sum(1 for st in deployments if st.state == "ready"),
        "running": len(status.busy_keys),
        "queued": sum(status.queued.values()),
        "watchers": len(watchers),
        "watchers_fresh": sum(1 for w in watchers if w["state"] == "fresh"),
        "reporters": status.load_reporters,
    }
    return {
        "name": status.name, "namespace": status.namespace, "at": now, "totals": totals,
        "models": models,
        "deployments": [_deployment(st) for st in sorted(deployments, key=lambda st: st.key)],
        "operations": {
            "running": [{"key": key, "queued": status.queued.get(key, 0)} for key in sorted(status.busy_keys)],
            "rollouts": [r.model_dump() for r in status.rollouts],
        },
        "watchers": watchers,
        "loops": [loop.model_dump() for loop in status.loops if loop.state != "running" or loop.restarts],
        "errors": _errors(status, deployments),
    }
