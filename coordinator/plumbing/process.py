"""Where an actor runs: its Ray node and PID (for placement checks, profiling and
the benchmarks' memory figures). Works outside Ray too (node ``None``)."""

from __future__ import annotations

import os


def process_info() -> dict[str, str | int | None]:
    try:
        import ray

        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        node_id = None
    return {"node_id": node_id, "pid": os.getpid()}
