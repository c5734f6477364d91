"""A fresh driver that calls every public method of Cluster, cluster.aio and
RayWorkerManager as the FIRST call on a fresh ``attach()``, in one mode:

- ``sync``: plain code on the main thread (a coroutine runs with asyncio.run);
- ``async``: inside one running event loop (blocking calls made from it too);
- ``thread``: plain code on another thread (coroutines with asyncio.run there).

Run by tests/test_first_calls.py against the session's Ray (RAY_ADDRESS).
Prints one JSON object: ``{"Face.method": "ok" | "refused: ..." | "error: ..."}``.
The methods are found by introspection; each needs its arguments in ARGS
below — one without them is reported as ``"error: no arguments listed"``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import threading
from collections.abc import Callable
from typing import Any

import coordinator
from coordinator.driver.client import AsyncCluster, Cluster
from coordinator.driver.worker_manager import RayWorkerManager

#: Not called: they remove the coordinator the other calls need.
SKIPPED = {"Cluster.stop", "AsyncCluster.stop"}


def public_methods(cls: type) -> list[str]:
    """The public methods of ``cls`` (properties and attributes aside)."""
    return sorted(name for name, member in inspect.getmembers(cls)
                  if not name.startswith("_") and inspect.isfunction(member)) + (
        ["config"] if isinstance(inspect.getattr_static(cls, "config", None), property) else [])


def arguments(name: str, port: int, mode: str) -> dict[str, tuple[tuple, dict]]:
    """The arguments of each method, by name. Models started, deployed or
    undeployed are named after the mode and face, so runs do not collide."""
    tag = f"{mode}-{name}".lower()
    startup = coordinator.WorkerStartupRequest(host="127.0.0.1", port=port, model=f"extra-{tag}",
                                               worker_type="llm", params={"provider": "proxy/sim"})
    chat = {"model": "chat", "messages": [{"role": "human", "content": "hi"}]}
    kept = coordinator.Deployment(model=f"kept-{tag}", replicas=0)
    cluster_args = {
        "config": ((), {}),
        "instances": (("chat",), {}),
        "wait_for": (("chat",), {"timeout": 30}),
        "apply": (("chat", "update_params"), {"params": {}}),
        "startup": ((startup,), {}),
        "shutdown": ((startup,), {}),
        "supported_models": ((), {}),
        "supports": ((), {}),
        "status": ((), {}),
        "deploy": ((kept,), {}),
        "undeploy": ((kept.model,), {}),
        "deployments": ((), {}),
        "plan": ((kept,), {}),
        "registry_url": ((), {}),
        "fleet_page_url": ((), {}),
        "serve": ((), {"port": 0}),
    }
    manager_args = {
        "supported_models": ((), {}),
        "model_startup": ((startup,), {}),
        "model_shutdown": ((startup,), {}),
        "worker_apply": ((coordinator.WorkerApplyRequest(model="chat", apply_type="update_params", params={}),),
                         {}),
        "get_model_instances": (("llm", "chat"), {}),
        "get_all_model_instances": (("llm",), {}),
        "sync_get_model_instances": (("llm", "chat"), {}),
        "generate_stream": ((chat,), {}),
        "generate": ((chat,), {}),
        "routed_stream": ((chat,), {}),
        "routed_call": (("chat@llm", "POST", "/generate"), {"json": chat}),
        "embeddings": (({"model": "vec", "input": ["a"]},), {}),
        "sync_embeddings": (({"model": "vec", "input": ["a"]},), {}),
        "count_token": (({"model": "chat", "prompt": "one two"},), {}),
        "get_model_metadata": (({"model": "chat"},), {}),
        "parameter_descriptions": (("llm", "chat"), {}),
        "select_one_instance": (("llm", "chat"), {}),
        "sync_select_one_instance": (("llm", "chat"), {}),
        "in_flight": ((), {}),
        "demand": (("chat@llm", 0), {}),  # a change of none: nothing to report
        "aclose": ((), {}),
    }
    return {"Cluster": cluster_args, "AsyncCluster": cluster_args, "RayWorkerManager": manager_args}[name]


def target(face: str, cluster_name: str) -> Any:
    """A fresh handle: the call made on it is its first."""
    cluster = coordinator.attach(cluster_name, namespace="tests")
    if face == "RayWorkerManager":
        return RayWorkerManager(cluster)
    return cluster.aio if face == "AsyncCluster" else cluster


def check(answer: Any) -> None:
    """An answer that says the call did not do its job counts as a failure."""
    if isinstance(answer, coordinator.ModelOutput) and not answer.success:
        raise AssertionError(f"error output: {answer.text}")
    if isinstance(answer, coordinator.WorkerApplyOutput) and not answer.success:
        raise AssertionError(f"failed: {answer.message}")
    if isinstance(answer, list) and answer and isinstance(answer[-1], coordinator.ModelOutput):
        check(answer[-1])


async def drain(value: Any) -> Any:
    if inspect.isasyncgen(value):
        return [item async for item in value]
    if inspect.isawaitable(value):
        return await value
    return value


def outcome(run: Callable[[], Any]) -> str:
    try:
        check(run())
        return "ok"
    except RuntimeError as exc:
        if "blocks; in async code use" in str(exc):
            return f"refused: {exc}"
        return f"error: RuntimeError: {exc}"
    except Exception as exc:  # noqa: BLE001 - reported, not swallowed
        return f"error: {type(exc).__name__}: {exc}"


def call(face: str, method: str, args: tuple, kwargs: dict, cluster_name: str, in_loop: bool) -> Any:
    """Call ``method`` first on a fresh handle. Outside a loop a coroutine
    (or async generator) runs to the end with asyncio.run."""
    obj = target(face, cluster_name)
    if method == "config" and face == "Cluster":
        return obj.config
    value = getattr(obj, method)(*args, **kwargs)
    if in_loop or not (inspect.isawaitable(value) or inspect.isasyncgen(value)):
        return value
    return asyncio.run(drain(value))


def run_all(mode: str, cluster_name: str, port: int) -> dict[str, str]:
    results: dict[str, str] = {}
    faces = (Cluster, AsyncCluster, RayWorkerManager)

    def each() -> Any:
        for cls in faces:
            args = arguments(cls.__name__, port, mode)
            methods = set(public_methods(cls))
            for method in sorted(methods - set(args)):
                if f"{cls.__name__}.{method}" not in SKIPPED:
                    results[f"{cls.__name__}.{method}"] = "error: no arguments listed"
            for method in args:  # in the order listed: startup before shutdown, deploy before undeploy
                if method in methods:
                    yield f"{cls.__name__}.{method}", cls.__name__, method, args[method]

    if mode == "async":
        async def main() -> None:
            for label, face, method, (a, kw) in each():
                async def one() -> Any:
                    return await drain(call(face, method, a, kw, cluster_name, in_loop=True))
                try:
                    check(await one())
                    results[label] = "ok"
                except RuntimeError as exc:
                    results[label] = (f"refused: {exc}" if "blocks; in async code use" in str(exc)
                                      else f"error: RuntimeError: {exc}")
                except Exception as exc:  # noqa: BLE001
                    results[label] = f"error: {type(exc).__name__}: {exc}"
        asyncio.run(main())
    else:
        def body() -> None:
            for label, face, method, (a, kw) in each():
                results[label] = outcome(lambda: call(face, method, a, kw, cluster_name, in_loop=False))
        if mode == "thread":
            worker = threading.Thread(target=body, name="first-calls")
            worker.start()
            worker.join()
        else:
            body()
    return results


if __name__ == "__main__":
    mode, cluster_name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(run_all(mode, cluster_name, port)))
