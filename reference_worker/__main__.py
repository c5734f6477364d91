"""``python -m reference_worker``: one reference worker manager as a process."""

from __future__ import annotations

import argparse
import asyncio
import logging

from actors.serving import serve_until_signalled
from coordinator.core.models import parse_worker_key
from reference_worker.sim import Faults, SimModel, WorkerSettings
from reference_worker.worker import ReferenceWorker

DESCRIPTION = ("A reference worker manager: DB-GPT's worker-manager HTTP API over simulated models, "
               "registering with a controller (the coordinator's embedded registry or DB-GPT's own).")


def _parse_model(spec: str) -> SimModel:
    name, wtype = parse_worker_key(spec) if "@" in spec else (spec, "llm")
    return SimModel(name=name, worker_type=wtype)


async def _serve(settings: WorkerSettings) -> None:
    worker = ReferenceWorker(settings)
    await worker.start()
    await serve_until_signalled(worker.address, worker.stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reference_worker", description=DESCRIPTION)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--controller", help="controller URL to register with, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", action="append", default=[], help="model[@worker_type]; repeatable")
    parser.add_argument("--heartbeat-interval", type=float, default=5.0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every worker call")
    parser.add_argument("--start-delay", type=float, default=0.0, help="seconds a model takes to start")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--chunks", type=int, default=4, help="chunks of a streamed answer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = WorkerSettings(
        host=args.host, port=args.port, controller=args.controller,
        heartbeat_interval=args.heartbeat_interval, models=[_parse_model(m) for m in args.model],
        faults=Faults(latency=args.latency), start_delay=args.start_delay,
        chunk_delay=args.chunk_delay, chunks=args.chunks,
    )
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
