"""Where an actor runs: its Ray node and PID (for placement checks, profiling and
the benchmarks' memory figures). Works outside Ray too (node ``None``)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def process_info() -> dict[str, str | int | None]:
    try:
        import ray

        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        node_id = None
    return {"node_id": node_id, "pid": os.getpid()}


def exit_for_restart(loop: str, error: BaseException) -> None:
    """A supervised loop that cannot be restarted in place: end the process,
    so that Ray restarts the actor cleanly (``max_restarts=-1``) instead of
    leaving it answering from a frozen view."""
    log.critical("loop %r cannot be restarted (%s: %s); exiting so that Ray restarts this actor",
                 loop, type(error).__name__, error)
    logging.shutdown()
    os._exit(1)
