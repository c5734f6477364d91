"""Wire models: the JSON shapes of DB-GPT 0.8.x's cluster protocol, and our results.

Everything here parses what a real DB-GPT controller or worker manager sends and
serialises to what it accepts (see docs/protocol.md). Unknown fields from a peer are
ignored, so a newer DB-GPT that adds a field does not break us.

A worker *key* is ``"{model_name}@{worker_type}"``; an *endpoint* is the
``(host, port)`` of one worker-manager process, which may serve many keys.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, NamedTuple

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from coordinator.core.hosts import host_problem, port_problem

#: The key under which every worker-manager process registers itself.
WORKER_MANAGER_KEY = "WorkerManager@service"
#: The longest model name or worker key accepted anywhere.
MAX_NAME = 256


def _valid(problem_of):
    def check(value):
        problem = problem_of(value)
        if problem:
            raise ValueError(problem)
        return value

    return check


def _not_bool(value: Any) -> Any:
    # Checked before pydantic's lax int coercion would turn True into port 1.
    if isinstance(value, bool):
        raise ValueError("must be an integer, not bool")
    return value


#: A bare hostname or IP literal (see coordinator.core.hosts): what may go in a URL.
Host = Annotated[str, AfterValidator(_valid(host_problem))]
#: A TCP port, 1-65535.
Port = Annotated[int, BeforeValidator(_not_bool), AfterValidator(_valid(port_problem))]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]


class WorkerType(StrEnum):
    LLM = "llm"
    TEXT2VEC = "text2vec"
    RERANKER = "reranker"
    SERVICE = "service"


class ApplyType(StrEnum):
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    UPDATE_PARAMS = "update_params"


class Endpoint(NamedTuple):
    """One worker-manager process, the unit a proxy actor serves."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def worker_key(model: str, worker_type: str | WorkerType) -> str:
    return f"{model}@{WorkerType(worker_type).value}"


def parse_worker_key(key: str) -> tuple[str, str]:
    """Split ``"name@type"`` at the last ``@`` (model names may contain ``@``)."""
    name, sep, wtype = key.rpartition("@")
    if not sep or not name or not wtype:
        raise ValueError(f"not a worker key (want 'model@worker_type'): {key!r}")
    return name, wtype


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ModelInstance(_Wire):
    """One registry entry: a worker key served at host:port."""

    model_name: Name
    host: Host
    port: Port
    weight: float | None = 1.0
    check_healthy: bool | None = True
    healthy: bool | None = False
    enabled: bool | None = True
    prompt_template: str | None = None
    last_heartbeat: datetime | None = None
    remove_from_registry: bool | None = False

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    @property
    def identity(self) -> tuple[str, str, int]:
        """What makes two entries the same entry: key and endpoint."""
        return (self.model_name, self.host, self.port)


class WorkerApplyRequest(_Wire):
    model: Name
    apply_type: ApplyType
    worker_type: WorkerType = WorkerType.LLM
    #: As in DB-GPT 0.8.2: a mapping, ``{}`` when there is nothing to say. DB-GPT
    #: answers ``"params": null`` with 422, so null is refused here too.
    params: dict[str, Any] = Field(default_factory=dict)
    apply_user: str | None = None

    @property
    def key(self) -> str:
        return worker_key(self.model, self.worker_type)


class WorkerStartupRequest(_Wire):
    host: Host
    port: Port
    model: Name
    worker_type: WorkerType
    params: dict[str, Any] = Field(default_factory=dict)
    delete_after: bool | None = False
    worker_name: str | None = None
    sys_code: str | None = None
    user_name: str | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    @property
    def key(self) -> str:
        return worker_key(self.model, self.worker_type)


class WorkerApplyOutput(_Wire):
    """What a worker answers to an operation, or what we say on its behalf.

    ``host``/``port`` name the worker the output is about; DB-GPT does not send
    them and ignores them when it reads ours.
    """

    message: str
    success: bool | None = True
    timecost: float | None = -1
    host: str | None = None
    port: int | None = None

    @staticmethod
    def reduce(outputs: list[WorkerApplyOutput]) -> WorkerApplyOutput:
        """Combine outputs as DB-GPT does: AND of success, max timecost, messages
        joined with ``"\\n;"``."""
        if not outputs:
            # DB-GPT's answer, default success included.
            return WorkerApplyOutput(message="Not outputs")
        return WorkerApplyOutput(
            message="\n;".join(o.message for o in outputs),
            success=all(bool(o.success) for o in outputs),
            timecost=max(o.timecost if o.timecost is not None else -1 for o in outputs),
        )


class SupportedModel(_Wire):
    model: str
    worker_type: str
    provider: str | None = None
    path: str | None = None
    path_exist: bool | None = False
    proxy: bool | None = False
    enabled: bool | None = False
    params: list[dict[str, Any]] | Any = None
    description: str | None = None


class WorkerSupportedModel(_Wire):
    host: str
    port: int
    models: list[SupportedModel]


class ApplyResult(BaseModel):
    """The answer to one apply: one output per targeted instance, and the combined
    output in DB-GPT's sense (what DB-GPT's ``worker_apply`` should have returned)."""

    outputs: list[WorkerApplyOutput]
    output: WorkerApplyOutput

    @classmethod
    def of(cls, outputs: list[WorkerApplyOutput]) -> ApplyResult:
        return cls(outputs=outputs, output=WorkerApplyOutput.reduce(outputs))

    @property
    def success(self) -> bool:
        return bool(self.output.success)

    @property
    def failed(self) -> list[WorkerApplyOutput]:
        return [o for o in self.outputs if not o.success]


class SupportsOutcome(BaseModel):
    """A worker's answer to ``GET /models/supports``: models, or why not."""

    endpoint: tuple[str, int]
    models: list[WorkerSupportedModel] = Field(default_factory=list)
    error: str | None = None

    @field_validator("endpoint", mode="before")
    @classmethod
    def _as_tuple(cls, v: Any) -> Any:
        return tuple(v)
