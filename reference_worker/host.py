"""Reference workers hosted inside a Ray actor, many to one process."""

from __future__ import annotations

from typing import Any

from reference_worker.engine import EngineFigures
from reference_worker.sim import Faults, SimModel, WorkerSettings
from reference_worker.worker import ReferenceWorker


class ReferenceWorkerHost:
    """Runs reference workers inside a Ray actor (``ray.remote(ReferenceWorkerHost)``);
    one actor may host many, so a benchmark fleet does not cost a process each."""

    def __init__(self) -> None:
        self._workers: dict[int, ReferenceWorker] = {}

    async def add(self, settings: WorkerSettings) -> int:
        worker = ReferenceWorker(settings)
        port = await worker.start()
        self._workers[port] = worker
        return port

    async def remove(self, port: int, deregister: bool = True) -> None:
        worker = self._workers.pop(port)
        await worker.stop(deregister=deregister)

    async def set_faults(self, port: int, **changes: Any) -> Faults:
        return self._workers[port].set_faults(**changes)

    async def journal(self, port: int) -> list[dict[str, Any]]:
        return list(self._workers[port].journal)

    async def peaks(self, port: int) -> tuple[dict[str, int], int]:
        """Most applies seen at once, per model key and in all."""
        worker = self._workers[port]
        return dict(worker.peak), worker.peak_total

    async def engine_figures(self, port: int) -> dict[str, EngineFigures]:
        """The cost-model engine's load figures per model (empty when it is off)."""
        return self._workers[port].engine_figures()

    async def models(self, port: int) -> dict[str, SimModel]:
        return self._workers[port].models

    async def ports(self) -> list[int]:
        return sorted(self._workers)

    async def stop_all(self) -> None:
        for port in list(self._workers):
            await self.remove(port)
