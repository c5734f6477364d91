"""A Ray-native control plane for fleets of DB-GPT-compatible model workers.

Start here::

    import coordinator
    cluster = coordinator.start({"registries": [{"kind": "embedded", "port": 8000}]})
    cluster.wait_for("chatgpt-test", count=2)
    result = cluster.apply("chatgpt-test", "restart")
    for out in result.outputs:
        print(out.host, out.port, out.success, out.message)
"""

from coordinator.client import AsyncCluster, Cluster, attach, start
from coordinator.config import (
    BackoffSettings,
    CoordinatorConfig,
    DbgptSource,
    EmbeddedSource,
    ProbeSettings,
    StaticSource,
    Timeouts,
)
from coordinator.errors import (
    CoordinatorError,
    CoordinatorNotFoundError,
    CoordinatorUnavailableError,
    NoInstancesError,
    UnknownEndpointError,
    WaitTimeoutError,
)
from coordinator.facade import RayWorkerManager, WorkerOperationError
from coordinator.models import (
    ApplyResult,
    ApplyType,
    Endpoint,
    ModelInstance,
    SupportedModel,
    SupportsOutcome,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
    WorkerSupportedModel,
    WorkerType,
)
from coordinator.rollout import ApplyPlan, RolloutProgress
from coordinator.status import ClusterStatus, InstanceStatus, WatcherStatus

__all__ = [
    "ApplyPlan",
    "ApplyResult",
    "ApplyType",
    "AsyncCluster",
    "BackoffSettings",
    "Cluster",
    "ClusterStatus",
    "CoordinatorConfig",
    "CoordinatorError",
    "CoordinatorNotFoundError",
    "CoordinatorUnavailableError",
    "DbgptSource",
    "EmbeddedSource",
    "Endpoint",
    "InstanceStatus",
    "ModelInstance",
    "NoInstancesError",
    "ProbeSettings",
    "RayWorkerManager",
    "RolloutProgress",
    "StaticSource",
    "SupportedModel",
    "SupportsOutcome",
    "Timeouts",
    "UnknownEndpointError",
    "WaitTimeoutError",
    "WatcherStatus",
    "WorkerApplyOutput",
    "WorkerApplyRequest",
    "WorkerOperationError",
    "WorkerStartupRequest",
    "WorkerSupportedModel",
    "WorkerType",
    "attach",
    "start",
]
