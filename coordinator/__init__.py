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
    "ApplyPlan": "coordinator.core.rollout",
    "ApplyResult": "coordinator.core.models",
    "ApplyType": "coordinator.core.models",
    "AsyncCluster": "coordinator.driver.client",
    "BackoffSettings": "coordinator.core.config",
    "Cluster": "coordinator.driver.client",
    "ClusterStatus": "coordinator.core.status",
    "CoordinatorConfig": "coordinator.core.config",
    "CoordinatorError": "coordinator.core.errors",
    "CoordinatorNotFoundError": "coordinator.core.errors",
    "CoordinatorUnavailableError": "coordinator.core.errors",
    "DbgptSource": "coordinator.core.config",
    "Deployment": "coordinator.core.deployments",
    "Autoscale": "coordinator.core.autoscale",
    "DeploymentEvent": "coordinator.core.deployments",
    "DeploymentNotReadyError": "coordinator.core.errors",
    "DeploymentStatus": "coordinator.core.deployments",
    "NotDeployedError": "coordinator.core.errors",
    "ReconcileSettings": "coordinator.core.config",
    "DrainSettings": "coordinator.core.config",
    "EmbeddedSource": "coordinator.core.config",
    "Endpoint": "coordinator.core.models",
    "InferenceError": "coordinator.driver.worker_manager",
    "OverloadedError": "coordinator.driver.worker_manager",
    "InstanceStatus": "coordinator.core.status",
    "ModelMetadata": "coordinator.core.inference",
    "ModelOutput": "coordinator.core.inference",
    "ParameterDescription": "coordinator.core.inference",
    "ModelInstance": "coordinator.core.models",
    "NoInstancesError": "coordinator.core.errors",
    "ProbeSettings": "coordinator.core.config",
    "RayWorkerManager": "coordinator.driver.worker_manager",
    "RolloutProgress": "coordinator.core.rollout",
    "StaticSource": "coordinator.core.config",
    "SupportedModel": "coordinator.core.models",
    "SupportsOutcome": "coordinator.core.models",
    "Timeouts": "coordinator.core.config",
    "UnknownEndpointError": "coordinator.core.errors",
    "WaitTimeoutError": "coordinator.core.errors",
    "ModelBusyError": "coordinator.core.errors",
    "WatcherStatus": "coordinator.core.status",
    "WorkerApplyOutput": "coordinator.core.models",
    "WorkerApplyRequest": "coordinator.core.models",
    "WorkerOperationError": "coordinator.driver.worker_manager",
    "WorkerStartupRequest": "coordinator.core.models",
    "WorkerSupportedModel": "coordinator.core.models",
    "WorkerType": "coordinator.core.models",
    "attach": "coordinator.driver.client",
    "load_config": "coordinator.core.config_sources",
    "start": "coordinator.driver.install",
    "stop": "coordinator.driver.install",
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
    "Autoscale",
    "DeploymentEvent",
    "DeploymentNotReadyError",
    "DeploymentStatus",
    "EmbeddedSource",
    "Endpoint",
    "InferenceError",
    "OverloadedError",
    "InstanceStatus",
    "ModelMetadata",
    "ModelOutput",
    "ParameterDescription",
    "ModelInstance",
    "NoInstancesError",
    "NotDeployedError",
    "ProbeSettings",
    "ReconcileSettings",
    "DrainSettings",
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
    "load_config",
    "start",
    "stop",
]
