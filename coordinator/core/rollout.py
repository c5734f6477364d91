"""Rolling operations, decided purely: which instances go in which batch, and what
a stopped rollout reports for the instances it never reached. No ray, no httpx."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from coordinator.core.models import ApplyType, Endpoint, WorkerApplyOutput

#: Operations that take an instance down and bring it back, so they can roll.
ROLLABLE = frozenset({ApplyType.RESTART, ApplyType.UPDATE_PARAMS})


class ApplyPlan(BaseModel):
    """What an apply would do: the batches, in order. ``dry_run=True`` returns
    this and sends nothing."""

    key: str
    apply_type: ApplyType
    batches: list[list[tuple[str, int]]] = Field(default_factory=list)

    @property
    def instances(self) -> int:
        return sum(len(b) for b in self.batches)


class ApplyOptions(BaseModel):
    """How an apply is carried out; validated in the driver."""

    model_config = ConfigDict(extra="forbid")

    apply_type: ApplyType
    max_unavailable: int | None = Field(None, ge=1)
    dry_run: bool = False
    #: Seconds a batch has to come back healthy before the rollout stops.
    health_timeout: float | None = Field(None, gt=0)
    #: The caller's timeout (seconds): every worker call of the operation ends
    #: within it, so the operation ends about when the caller stops waiting.
    timeout: float | None = Field(None, gt=0)
    #: Seconds each instance is drained at most before it is stopped,
    #: restarted or reconfigured (None: the config's ``drain.timeout``; 0: no drain).
    drain_timeout: float | None = Field(None, ge=0)

    @field_validator("max_unavailable", mode="after")
    @classmethod
    def _rollable(cls, max_unavailable: int | None, info: ValidationInfo) -> int | None:
        # On the field, not the model: the error names max_unavailable.
        if "apply_type" in info.data:  # else apply_type's own error says what is wrong
            check_rollable(info.data["apply_type"], max_unavailable)
        return max_unavailable


class RolloutProgress(BaseModel):
    key: str
    batches: int
    done: int = 0  # batches finished (applied and through the health gate)
    current: list[tuple[str, int]] = Field(default_factory=list)
    phase: str = "applying"  # draining | applying | waiting for health | finished | stopped


def plan_batches(targets: list[Endpoint], max_unavailable: int | None) -> list[list[Endpoint]]:
    """All at once (DB-GPT's way) without ``max_unavailable``; else consecutive
    batches of at most that many, in target order."""
    if max_unavailable is None:
        return [list(targets)] if targets else []
    if max_unavailable < 1:
        raise ValueError("max_unavailable must be at least 1")
    return [list(targets[i : i + max_unavailable]) for i in range(0, len(targets), max_unavailable)]


def check_rollable(apply_type: ApplyType, max_unavailable: int | None) -> None:
    if max_unavailable is not None and apply_type not in ROLLABLE:
        raise ValueError(
            f"max_unavailable applies to restart and update_params, not {apply_type.value}: "
            "a stopped instance never comes back healthy"
        )


def not_attempted(endpoints: list[Endpoint], why: str) -> list[WorkerApplyOutput]:
    return [
        WorkerApplyOutput(message=f"{ep}: not attempted: {why}", success=False, timecost=-1, host=ep.host, port=ep.port)
        for ep in endpoints
    ]
