"""The errors a driver sees. Request-level mistakes raise; a worker's failure never
does — it becomes a ``WorkerApplyOutput(success=False)`` naming the worker.

::

    CoordinatorError
    ├── NoInstancesError            apply to a model@type that no registry lists
    ├── UnknownEndpointError        startup/shutdown to a host:port no registry lists
    ├── WaitTimeoutError            wait_for() saw too few healthy instances in time
    │   └── DeploymentNotReadyError deploy(wait=True) timed out; names the state and why
    ├── NotDeployedError            undeploy() of a model@type with no deployment
    ├── ModelBusyError              too many distinct operations already wait for
    │                               that model@type (max_queued_operations)
    ├── CoordinatorUnavailableError the coordinator actor is gone, restarting, or
    │                               did not answer in time
    ├── CoordinatorNotFoundError    attach() to a name that is not running
    └── AlreadyRunningError         start() with a config other than the running
                                    coordinator's (names the fields that differ)

    ConfigFileError (a ValueError)  a config or fleet file that is not YAML:
                                    says file:line:column and what is wrong

Bad input raises ``pydantic.ValidationError`` before anything is sent.
The worker-call errors a proxy maps httpx exceptions to live in
``coordinator.plumbing.transport``; they never leave the proxy.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of every error this package raises on purpose.

    Subclasses keep the arguments they were built from in ``_args`` so that they
    survive pickling (Ray carries them from the coordinator to the driver).
    """

    _args: tuple = ()

    def __reduce__(self):
        return (type(self), self._args) if self._args else super().__reduce__()


class NoInstancesError(CoordinatorError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no registry lists any instance of {key}")
        self.key, self._args = key, (key,)


class UnknownEndpointError(CoordinatorError):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"no registry lists a worker manager at {host}:{port}")
        self.host, self.port, self._args = host, port, (host, port)


class ModelBusyError(CoordinatorError):
    def __init__(self, key: str, depth: int) -> None:
        super().__init__(
            f"{key} is busy: {depth} distinct operations already wait for it (max_queued_operations); "
            f"nothing was sent — try again when they have run"
        )
        self.key, self.depth, self._args = key, depth, (key, depth)


class CoordinatorUnavailableError(CoordinatorError):
    """The call may or may not have been carried out; the message says which step
    failed."""


class CoordinatorNotFoundError(CoordinatorError):
    def __init__(self, name: str, namespace: str) -> None:
        super().__init__(f"no coordinator named {name!r} is running in namespace {namespace!r}")
        self.name, self.namespace, self._args = name, namespace, (name, namespace)


class WaitTimeoutError(CoordinatorError, TimeoutError):
    pass


class DeploymentNotReadyError(WaitTimeoutError):
    """``deploy(..., wait=True)`` ran out of time; says the deployment's state."""

    def __init__(self, key: str, status: str) -> None:
        super().__init__(f"deployment {key} not ready: {status}")
        self.key, self.status, self._args = key, status, (key, status)


class NotDeployedError(CoordinatorError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no deployment of {key}")
        self.key, self._args = key, (key,)


class AlreadyRunningError(CoordinatorError):
    def __init__(self, name: str, differs: list[str], advice: str = "attach() to it as it is, or stop it first") -> None:
        super().__init__(f"coordinator {name!r} is already running with another config (it differs in: "
                         f"{', '.join(differs) or 'details'}); {advice}")
        self.name, self.differs, self._args = name, differs, (name, differs, advice)


class ConfigFileError(ValueError):
    """A file that could not be read as YAML: ``path:line:column: problem``."""
