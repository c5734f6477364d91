"""A Ray-native control plane for fleets of DB-GPT-compatible model workers.

Start here::

    import coordinator
    cluster = coordinator.start({"registries": [{"kind": "embedded", "port": 8000}]})
    cluster.wait_for("chatgpt-test", count=2)
    result = cluster.apply("chatgpt-test", "restart")
    for out in result.outputs:
        print(out.host, out.port, out.success, out.message)
"""

# What each public name is imported from. Imported on first use (PEP 562), so
# that an actor process importing one module of this package (a proxy needs
# the config and the wire models) does not load the driver's client, the CLI's
# dependencies and the rest.
_WHERE = {
    "ApplyPlan": "coordinator.rollout",
    "ApplyResult": "coordinator.models",
    "ApplyType": "coordinator.models",
    "AsyncCluster": "coordinator.client",
    "BackoffSettings": "coordinator.config",
    "Cluster": "coordinator.client",
    "ClusterStatus": "coordinator.status",
    "CoordinatorConfig": "coordinator.config",
    "CoordinatorError": "coordinator.errors",
    "CoordinatorNotFoundError": "coordinator.errors",
    "CoordinatorUnavailableError": "coordinator.errors",
    "DbgptSource": "coordinator.config",
    "Deployment": "coordinator.deployments",
    "DeploymentEvent": "coordinator.deployments",
    "DeploymentNotReadyError": "coordinator.errors",
    "DeploymentStatus": "coordinator.deployments",
    "NotDeployedError": "coordinator.errors",
    "ReconcileSettings": "coordinator.config",
    "EmbeddedSource": "coordinator.config",
    "Endpoint": "coordinator.models",
    "InferenceError": "coordinator.worker_manager",
    "InstanceStatus": "coordinator.status",
    "ModelMetadata": "coordinator.inference",
    "ModelOutput": "coordinator.inference",
    "ParameterDescription": "coordinator.inference",
    "ModelInstance": "coordinator.models",
    "NoInstancesError": "coordinator.errors",
    "ProbeSettings": "coordinator.config",
    "RayWorkerManager": "coordinator.worker_manager",
    "RolloutProgress": "coordinator.rollout",
    "StaticSource": "coordinator.config",
    "SupportedModel": "coordinator.models",
    "SupportsOutcome": "coordinator.models",
    "Timeouts": "coordinator.config",
    "UnknownEndpointError": "coordinator.errors",
    "WaitTimeoutError": "coordinator.errors",
    "ModelBusyError": "coordinator.errors",
    "WatcherStatus": "coordinator.status",
    "WorkerApplyOutput": "coordinator.models",
    "WorkerApplyRequest": "coordinator.models",
    "WorkerOperationError": "coordinator.worker_manager",
    "WorkerStartupRequest": "coordinator.models",
    "WorkerSupportedModel": "coordinator.models",
    "WorkerType": "coordinator.models",
    "attach": "coordinator.client",
    "start": "coordinator.client",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


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
    "Deployment",
    "DeploymentEvent",
    "DeploymentNotReadyError",
    "DeploymentStatus",
    "EmbeddedSource",
    "Endpoint",
    "InferenceError",
    "InstanceStatus",
    "ModelMetadata",
    "ModelOutput",
    "ParameterDescription",
    "ModelInstance",
    "NoInstancesError",
    "NotDeployedError",
    "ProbeSettings",
    "ReconcileSettings",
    "RayWorkerManager",
    "RolloutProgress",
    "StaticSource",
    "SupportedModel",
    "SupportsOutcome",
    "Timeouts",
    "UnknownEndpointError",
    "WaitTimeoutError",
    "ModelBusyError",
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
