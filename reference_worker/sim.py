"""What the reference worker simulates: its models, its fault knobs and its
settings (no server here)."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import AliasChoices, BaseModel, Field

from coordinator.core.config import ServeTls
from coordinator.core.models import worker_key
from reference_worker.engine import EngineSettings

#: Providers the simulated worker accepts in a startup request.
#: Worker calls a journal keeps (the oldest are dropped).
JOURNAL_LIMIT = 10_000

KNOWN_PROVIDERS = {"proxy/openai", "proxy/sim", "hf", "vllm", "llama.cpp"}


class SimModel(BaseModel):
    name: str
    worker_type: str = "llm"
    provider: str = "proxy/openai"
    params: dict[str, Any] = Field(default_factory=dict)
    running: bool = True

    @property
    def key(self) -> str:
        return worker_key(self.name, self.worker_type)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.provider}"


class Faults(BaseModel):
    latency: float = Field(0.0, ge=0)
    fail_next: int = Field(0, ge=0)
    hang: bool = False
    #: Answer every worker call with a malformed response of this kind.
    garbage: Literal["html", "not_json", "wrong_shape", "truncated"] | None = None
    #: Drop the connection of a generate_stream after this many chunks.
    stream_cut_after: int | None = Field(None, ge=0)


def garbage(kind: str) -> Response:
    match kind:
        case "html":
            return HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>", status_code=500)
        case "not_json":
            return PlainTextResponse("OK")
        case "wrong_shape":
            return JSONResponse({"unexpected": True})
    # Promise more bytes than are sent: the connection closes mid-body.
    return Response('{"message": "cut sh', media_type="application/json", headers={"content-length": "400"})


class WorkerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0
    controller: str | None = None  # controller_addr; None: do not register
    heartbeat_interval: float = 5.0
    models: list[SimModel] = Field(default_factory=list)
    #: Seconds a model takes to load, in every start (start, startup, and the
    #: start half of a restart or of an update_params that reloads): meanwhile
    #: it is listed but not running, so inference is refused. ``start_delay``,
    #: its older name, is still accepted.
    load_s: float = Field(0.0, ge=0, validation_alias=AliasChoices("load_s", "start_delay"))
    #: Seconds a model takes to unload, after its requests in flight are aborted.
    stop_delay: float = 0.0
    #: Inference: chunks a streamed answer has, seconds between them, and the
    #: size of an embedding.
    chunks: int = Field(4, ge=1)
    chunk_delay: float = Field(0.0, ge=0)
    embedding_dim: int = Field(8, ge=1)
    faults: Faults = Faults()
    #: Serve https (and, with a client CA, require client certificates).
    tls: ServeTls | None = None
    #: Answer worker calls without ``Authorization: Bearer <this>`` with 401
    #: (DB-GPT's workers check nothing; this stands for a protecting proxy).
    require_token: str | None = None
    #: A cost model of an LLM engine (slots, prefix cache, prefill and decode
    #: costs, vLLM's figures on ``GET /metrics``); None: off, as before.
    engine: EngineSettings | None = None


class Fault(Exception):
    pass


def vector(text: str, dim: int) -> list[float]:
    """A fixed pseudo-embedding of ``text``: the same text, the same vector."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(digest[i % len(digest)] / 255.0, 6) for i in range(dim)]
