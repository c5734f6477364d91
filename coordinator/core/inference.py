"""DB-GPT's inference wire models, and the pure parts of serving a request:
reading a NUL-delimited stream, and the route table's rows. No I/O. (The
choice of an instance is in :mod:`coordinator.core.routing`; ``Candidate`` and
``choose`` are re-exported here.)

On the wire (docs/protocol.md, "Inference routes") DB-GPT 0.8.2 writes a
``ModelOutput`` as its dataclass: the text inside ``content`` (``{"type":
"text", "object": {"data": ..., "format": "text"}}``, or a list of such parts,
thinking first). It reads either ``text`` or ``content`` back (never both).
:class:`ModelOutput` here takes either, exposes ``text``, and writes DB-GPT's form.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Candidate and the power-of-two choice live with the other routing policies
# (coordinator.core.routing); re-exported here for existing callers.
from coordinator.core.routing.base import Candidate
from coordinator.core.routing.power_of_two import choose

__all__ = ["DELIMITER", "Candidate", "ChunkReader", "ModelMetadata", "ModelOutput", "ParameterDescription", "Route",
           "choose", "route_identity"]

#: What DB-GPT's worker manager writes after each streamed ModelOutput.
DELIMITER = b"\0"


class ModelOutput(BaseModel):
    """One answer (or one chunk of a streamed answer) of a model."""

    model_config = ConfigDict(extra="ignore")

    text: str = ""
    error_code: int = 0  # 0: success
    incremental: bool = False  # a chunk carries only its own text (else: the text so far)
    model_context: dict[str, Any] | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    #: Reasoning text, when the model sends it as a separate part.
    thinking: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_content(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or "content" not in data:
            return data
        data = dict(data)
        parts = data.pop("content")
        parts = parts if isinstance(parts, list) else [parts]
        texts = [p for p in parts if isinstance(p, Mapping) and p.get("type", "text") == "text"]
        thinking = [p for p in parts if isinstance(p, Mapping) and p.get("type") == "thinking"]
        data.setdefault("text", _data(texts[-1]) if texts else "")
        if thinking:
            data.setdefault("thinking", _data(thinking[-1]))
        return data

    @property
    def success(self) -> bool:
        return self.error_code == 0

    def to_wire(self) -> dict[str, Any]:
        """As DB-GPT 0.8.2's worker manager writes it."""
        text = {"type": "text", "object": {"data": self.text, "format": "text"}}
        content: Any = text
        if self.thinking is not None:
            content = [{"type": "thinking", "object": {"data": self.thinking, "format": "text"}}, text]
        return {"content": content, "error_code": self.error_code, "incremental": self.incremental,
                "model_context": self.model_context, "finish_reason": self.finish_reason, "usage": self.usage,
                "metrics": self.metrics}

    @classmethod
    def error(cls, message: str, code: int = 1) -> ModelOutput:
        """A failed answer, as DB-GPT reports one (it never raises from generate)."""
        return cls(text=f"**LLMServer Generate Error, Please CheckErrorInfo.**: {message}", error_code=code)


def _data(part: Mapping[str, Any]) -> str:
    obj = part.get("object")
    return str(obj.get("data", "")) if isinstance(obj, Mapping) else str(obj or "")


class ModelMetadata(BaseModel):
    """What ``/model_metadata`` answers."""

    model_config = ConfigDict(extra="allow")

    model: str | list[str]
    label: str | None = None
    context_length: int | None = None
    max_output_length: int | None = None
    description: str | None = None
    link: str | None = None
    chat_model: bool | None = True
    function_calling: bool | None = False
    metadata: dict[str, Any] | None = Field(default_factory=dict)
    ext_metadata: dict[str, Any] | None = Field(default_factory=dict)


class ParameterDescription(BaseModel):
    """One entry of ``/parameter/descriptions``."""

    model_config = ConfigDict(extra="allow")

    required: bool = False
    is_array: bool = False
    param_name: str | None = None
    param_class: str | None = None
    param_type: str | None = None
    label: str | None = None
    description: str | None = None
    default_value: Any = None
    valid_values: list[Any] | None = None
    ext_metadata: dict[str, Any] | None = None
    nested_fields: dict[str, list[ParameterDescription]] | None = None


class ChunkReader:
    """Splits a byte stream at DB-GPT's NUL delimiter, however the bytes arrive."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Iterator[ModelOutput]:
        self._buffer += data
        while DELIMITER in self._buffer:
            chunk, self._buffer = self._buffer.split(DELIMITER, 1)
            if chunk.strip():
                # json.loads, not pydantic's parser: that one refuses what
                # Python's json writes for a lone surrogate ("\ud800").
                yield ModelOutput.model_validate(json.loads(chunk))

    @property
    def pending(self) -> bytes:
        """Bytes after the last delimiter (a stream that ends here was cut)."""
        return self._buffer


# ---- the instances requests may go to ---------------------------------------


class Route(NamedTuple):
    """An instance requests may go to: listed healthy, enabled, and not found
    unreachable by the probes. The coordinator keeps a table of them; callers
    follow it (see coordinator.driver.router)."""

    model_name: str  # the worker key
    host: str
    port: int
    weight: float
    sources: tuple[str, ...]  # the registries that list it (for worker access settings)

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def identity(self) -> tuple[str, str, int]:
        return (self.model_name, self.host, self.port)


def route_identity(route: Route) -> tuple[str, str, int]:
    return route.identity

