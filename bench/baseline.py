"""The original algorithm, for comparison: DB-GPT's RemoteWorkerManager as
docs/protocol.md describes it, written here from that description.

Per call it asks the registry for the model's instances, then fans out with
``asyncio.gather``, opening a new ``httpx.AsyncClient`` for every request (3600 s
timeout, no retries), and returns only the first output.
"""

from __future__ import annotations

import asyncio

import httpx

TIMEOUT = 3600


class BaselineManager:
    def __init__(self, controller: str) -> None:
        self._controller = controller

    async def _instances(self, key: str) -> list[dict]:
        async with httpx.AsyncClient() as client:
            r = await client.get(
                f"{self._controller}/api/controller/models",
                params={"model_name": key, "healthy_only": False},
                timeout=TIMEOUT,
            )
            return r.json()

    async def _fetch(self, inst: dict, method: str, path: str, json: dict | None = None) -> httpx.Response:
        async with httpx.AsyncClient() as client:  # a new client for every request
            request = client.build_request(
                method, f"http://{inst['host']}:{inst['port']}/api/worker{path}", json=json, timeout=TIMEOUT
            )
            response = await client.send(request)
            if response.status_code != 200:
                raise Exception(f"Request to {request.url} failed, error: {response.text}")
            return response

    async def worker_apply(self, model: str, apply_type: str = "start", worker_type: str = "llm") -> dict:
        # What DB-GPT's own WorkerApplyRequest.dict() sends: params defaults to {}.
        body = {"model": model, "apply_type": apply_type, "worker_type": worker_type, "params": {},
                "apply_user": None}
        instances = await self._instances(f"{model}@{worker_type}")
        results = await asyncio.gather(*(self._fetch(i, "POST", "/apply", body) for i in instances))
        return results[0].json()  # the rest are dropped, as in the original

    async def supported_models(self) -> list[dict]:
        instances = [i for i in await self._instances("WorkerManager@service") if i["healthy"]]
        results = await asyncio.gather(*(self._fetch(i, "GET", "/models/supports") for i in instances))
        return [m for r in results for m in r.json()]
