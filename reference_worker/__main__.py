"""``python -m reference_worker``: one reference worker manager as a process."""

from __future__ import annotations

import argparse
import asyncio
import logging

from pydantic import ValidationError

from actors.serving import serve_until_signalled
from coordinator.core.models import parse_worker_key
from reference_worker.engine import EngineSettings
from reference_worker.sim import Faults, SimModel, WorkerSettings
from reference_worker.worker import ReferenceWorker

DESCRIPTION = ("A reference worker manager: DB-GPT's worker-manager HTTP API over simulated models, "
               "registering with a controller (the coordinator's embedded registry or DB-GPT's own).")


def _parse_model(spec: str) -> SimModel:
    name, wtype = parse_worker_key(spec) if "@" in spec else (spec, "llm")
    return SimModel(name=name, worker_type=wtype)


_DEFAULTS = EngineSettings()
ENGINE_FLAGS = [
    ("--slots", int, f"requests running at once; more wait (default {_DEFAULTS.slots})"),
    ("--cache-tokens", int, f"prefix cache capacity in tokens (default {_DEFAULTS.cache_tokens})"),
    ("--prefill-ms-per-token", float,
     f"prefill cost of an uncached prompt token (default {_DEFAULTS.prefill_ms_per_token})"),
    ("--cached-prefill-ms-per-token", float,
     f"prefill cost of a cached prompt token (default {_DEFAULTS.cached_prefill_ms_per_token})"),
    ("--decode-ms-per-chunk", float, f"cost of each streamed chunk (default {_DEFAULTS.decode_ms_per_chunk})"),
    ("--block-chars", int, f"characters per cached block, a multiple of 4 (default {_DEFAULTS.block_chars})"),
]


def _engine_settings(args: argparse.Namespace) -> EngineSettings | None:
    given = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in ENGINE_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    if not given and not args.engine:
        return None
    return EngineSettings(**given)


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
    parser.add_argument("--load-s", "--start-delay", dest="load_s", type=float, default=0.0, metavar="SECONDS",
                        help="seconds a model takes to load, in every start, restart or reload "
                             "(--start-delay: its older name)")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--chunks", type=int, default=4, help="chunks of a streamed answer")
    engine = parser.add_argument_group(
        "cost-model engine", "any of these turns it on (the others keep their defaults); "
        "a token is 4 characters")
    engine.add_argument("--engine", action="store_true", help="turn the engine on with every default")
    for flag, kind, help_ in ENGINE_FLAGS:
        engine.add_argument(flag, type=kind, default=None, help=help_)
    args = parser.parse_args(argv)
    try:
        engine_settings = _engine_settings(args)
    except ValidationError as exc:
        problem = exc.errors()[0]
        parser.error(f"--{str(problem['loc'][0]).replace('_', '-')}: {problem['msg']}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = WorkerSettings(
        host=args.host, port=args.port, controller=args.controller,
        heartbeat_interval=args.heartbeat_interval, models=[_parse_model(m) for m in args.model],
        faults=Faults(latency=args.latency), load_s=args.load_s,
        chunk_delay=args.chunk_delay, chunks=args.chunks, engine=engine_settings,
    )
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
