"""One API, two faces: every blocking call of a Cluster has its coroutine twin
on ``cluster.aio``, with the same parameters."""

from __future__ import annotations

import inspect

from coordinator.driver.client import AsyncCluster, Cluster


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_every_cluster_call_has_its_async_twin_with_the_same_parameters():
    assert public(Cluster) - {"aio"} == public(AsyncCluster)
    for name in public(AsyncCluster) - {"config"}:  # a property on one face, a coroutine on the other
        blocking, awaitable = getattr(Cluster, name), getattr(AsyncCluster, name)
        assert inspect.iscoroutinefunction(awaitable), name
        assert inspect.signature(blocking) == inspect.signature(awaitable).replace(
            return_annotation=inspect.signature(blocking).return_annotation), name
