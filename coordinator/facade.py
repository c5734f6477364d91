"""``RayWorkerManager``: DB-GPT's ``RemoteWorkerManager`` method names and return
types over a :class:`~coordinator.client.Cluster`, so DB-GPT-style code can switch
by changing one constructor.

Differences that are on purpose: ``worker_apply`` combines *every* instance's
output (DB-GPT returns only the first), and the instance getters return
``ModelInstance`` (DB-GPT's ``WorkerRunData`` is its in-process bookkeeping).
"""

from __future__ import annotations

from coordinator.client import Cluster
from coordinator.errors import CoordinatorError
from coordinator.models import (
    ModelInstance,
    WorkerApplyOutput,
    WorkerApplyRequest,
    WorkerStartupRequest,
    WorkerSupportedModel,
)


class WorkerOperationError(CoordinatorError):
    """A startup/shutdown the worker did not carry out; DB-GPT raises here too."""

    def __init__(self, output: WorkerApplyOutput) -> None:
        super().__init__(output.message)
        self.output, self._args = output, (output,)


class RayWorkerManager:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def supported_models(self) -> list[WorkerSupportedModel]:
        return await self.cluster.aio.supported_models()

    async def model_startup(self, startup_req: WorkerStartupRequest) -> None:
        output = await self.cluster.aio.startup(startup_req)
        if not output.success:
            raise WorkerOperationError(output)

    async def model_shutdown(self, shutdown_req: WorkerStartupRequest) -> None:
        output = await self.cluster.aio.shutdown(shutdown_req)
        if not output.success:
            raise WorkerOperationError(output)

    async def worker_apply(self, apply_req: WorkerApplyRequest) -> WorkerApplyOutput:
        req = WorkerApplyRequest.model_validate(apply_req)
        result = await self.cluster.aio.apply(req.model, req.apply_type, req.worker_type, req.params)
        return result.output

    async def get_model_instances(
        self, worker_type: str, model_name: str, healthy_only: bool = True
    ) -> list[ModelInstance]:
        return await self.cluster.aio.instances(model_name, worker_type, healthy_only)

    async def get_all_model_instances(self, worker_type: str, healthy_only: bool = True) -> list[ModelInstance]:
        return await self.cluster.aio.instances(None, worker_type, healthy_only)

    def sync_get_model_instances(
        self, worker_type: str, model_name: str, healthy_only: bool = True
    ) -> list[ModelInstance]:
        return self.cluster.instances(model_name, worker_type, healthy_only)
