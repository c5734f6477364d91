"""DB-GPT 0.8.2's own RemoteWorkerManager, reading a registry through DB-GPT's
own ModelRegistryClient: run with the DB-GPT virtual environment's Python.

    python original_manager.py REGISTRY_URL MODEL [APPLY_TYPE]

Prints one JSON object: the worker managers and the model's instances the
original sees (healthy only, as it asks), and, given an apply type, what its
``worker_apply`` returned."""

import asyncio
import json
import sys

from dbgpt.model.cluster.base import WorkerApplyRequest
from dbgpt.model.cluster.controller.controller import ModelRegistryClient
from dbgpt.model.cluster.worker.remote_manager import RemoteWorkerManager


def endpoints(run_data) -> list[str]:
    return sorted(f"{w.host}:{w.port}" for w in run_data)


async def main(url: str, model: str, apply_type: str | None) -> dict:
    manager = RemoteWorkerManager(model_registry=ModelRegistryClient(url))
    answer = {
        "managers": endpoints(await manager.get_model_instances("service", "WorkerManager")),
        "instances": endpoints(await manager.get_model_instances("llm", model)),
        "sync_instances": endpoints(manager.sync_get_model_instances("llm", model)),
    }
    if apply_type:
        out = await manager.worker_apply(WorkerApplyRequest(model=model, apply_type=apply_type))
        answer["apply"] = {"success": out.success, "message": out.message}
    return answer


if __name__ == "__main__":
    url, model, *rest = sys.argv[1:]
    print(json.dumps(asyncio.run(main(url, model, rest[0] if rest else None))))
