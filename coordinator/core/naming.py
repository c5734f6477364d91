"""Names of the named Ray actors that make up one coordinator deployment, in one
place so the driver, the coordinator and the watchers agree."""

from __future__ import annotations

DEFAULT_NAME = "dbgpt-coordinator"
DEFAULT_NAMESPACE = "dbgpt"


def watcher_actor(coordinator: str, source: str) -> str:
    return f"{coordinator}/watcher/{source}"


def registry_actor(coordinator: str, source: str) -> str:
    return f"{coordinator}/registry/{source}"


def gateway_actor(coordinator: str, replica: int | str) -> str:
    return f"{coordinator}/gateway/{replica}"


def deployments_key(coordinator: str, namespace: str) -> str:
    """Where a coordinator keeps its deployments in the GCS key-value store."""
    return f"deployments/{namespace}/{coordinator}"
