"""OpenAI's API as the gateway speaks it: the request models, their translation
to DB-GPT's worker protocol (docs/protocol.md, "Inference routes"), and
DB-GPT's answers translated back into OpenAI's shapes. Pure: no I/O, no clock
(``created`` is passed in), no randomness (ids are passed in).

Why this module is long: it is one wire format, both directions — requests in,
bodies to workers out, streams and answers back, errors — kept in one place so
that what the gateway accepts and what it promises to send can be read together.

Requests (parse with :func:`parse_chat`, :func:`parse_completion`,
:func:`parse_embeddings`, which take the raw body or a decoded object and the
operator's :class:`OpenAILimits`). Every refusal is a :class:`pydantic.
ValidationError` whose first error's location is the bad field;
:func:`validation_error_body` turns it into OpenAI's 400 body with that field
as ``param`` (``"messages.0.role"``). Unknown fields are ignored, as OpenAI's
server ignores them; fields that ask for something a DB-GPT worker cannot do
(tools, logprobs, JSON mode, ``n`` > 1, image parts...) are refused by name
rather than silently dropped. Types are strict: ``"max_tokens": "10"`` is
refused, ``"temperature": 1`` is a number.

* Messages: roles ``system``, ``developer`` (OpenAI's newer name for it),
  ``user``, ``assistant`` become DB-GPT's ``system``, ``system``, ``human``,
  ``ai``; ``tool`` and ``function`` are refused. ``content`` is a string or a
  list of ``{"type": "text", "text": ...}`` parts, joined with ``"\\n"`` (as
  vLLM joins them); an assistant message may have ``content: null`` (empty).
* ``max_completion_tokens`` wins over ``max_tokens``; either becomes
  ``max_new_tokens``. ``stop`` (a string or up to 4 strings) is sent as a list.
  ``seed`` and ``user`` are accepted and not passed on (DB-GPT's PromptRequest
  has no such fields).
* ``/v1/completions``: one prompt per request (a string, or a list of exactly
  one string); ``max_tokens`` defaults to 16 as OpenAI's does.
* ``/v1/embeddings``: ``input`` a string or a list of strings (token-id inputs
  refused); ``encoding_format`` ``float`` or ``base64`` (little-endian float32,
  as OpenAI encodes); ``dimensions`` refused (the model's own size is what a
  DB-GPT worker gives).

Answers:

* Streams: :class:`StreamTranslator` turns DB-GPT ModelOutputs into
  ``chat.completion.chunk`` (or ``text_completion``) dicts; frame them with
  :func:`sse`, end with :data:`SSE_DONE`.
* Usage is DB-GPT's ``usage`` (``prompt_tokens``, ``completion_tokens``,
  ``total_tokens``) when the worker reports it, and omitted (``null``)
  otherwise: never estimated, as an estimate would be wrong for billing. An
  embeddings answer must carry usage in OpenAI's schema; DB-GPT's carries none,
  so it says 0 tokens.
* ``finish_reason``: DB-GPT's when it is one of OpenAI's (``stop``, ``length``,
  ``content_filter``, ``tool_calls``, ``function_call``), else ``"stop"``.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from coordinator.core.inference import ModelOutput

__all__ = [
    "DEFAULT_LIMITS", "FAILURES", "ROLES", "SSE_DONE", "ChatCompletionRequest", "ChatMessage",
    "CompletionRequest", "EmbeddingRequest", "EmbeddingsRequestBody", "Failure", "OpenAILimits",
    "PromptRequestBody", "StreamOptions", "StreamTranslator", "WorkerAnswerError", "chat_completion_response",
    "completion_response", "embeddings_response", "error_body", "error_response", "make_id", "models_response",
    "parse_chat", "parse_completion", "parse_embeddings", "render_prompt", "sse", "to_dbgpt_chat",
    "to_dbgpt_completion", "to_dbgpt_embeddings", "validation_error_body", "worker_error",
]


# ---- limits ---------------------------------------------------------------


class OpenAILimits(BaseModel):
    """What one request may ask for; safe by default. Violations are refused
    as validation errors naming the field. ``max_body_bytes`` is enforced by
    the gateway as it reads the body (413); the rest by the request models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1)
    max_messages: int = Field(1024, ge=1)
    #: Per message (after joining its text parts), per prompt, per embedding input.
    max_message_chars: int = Field(1_000_000, ge=1)
    max_stop: int = Field(4, ge=1)  # OpenAI's own limit
    max_stop_chars: int = Field(1_000, ge=1)
    max_embedding_inputs: int = Field(2048, ge=1)  # OpenAI's own limit
    max_tokens: int = Field(1_000_000, ge=1)
    max_model_chars: int = Field(256, ge=1)
    #: ``max_new_tokens`` sent to the worker when a chat request gives none
    #: (None: the worker's own default).
    default_max_tokens: int | None = Field(None, ge=1)


DEFAULT_LIMITS = OpenAILimits()


def _limits(info: ValidationInfo) -> OpenAILimits:
    context = info.context
    if isinstance(context, Mapping) and isinstance(context.get("limits"), OpenAILimits):
        return context["limits"]
    return DEFAULT_LIMITS


# ---- shared validation ------------------------------------------------------

_REQUEST = ConfigDict(extra="ignore", strict=True, frozen=True)


def _check_model(value: str, info: ValidationInfo) -> str:
    if not value:
        raise ValueError("must not be empty")
    if len(value) > _limits(info).max_model_chars:
        raise ValueError(f"must be at most {_limits(info).max_model_chars} characters")
    return value


def _check_max_tokens(value: int | None, info: ValidationInfo) -> int | None:
    if value is None:
        return None
    if value < 1:
        raise ValueError(f"must be at least 1 (got {value})")
    if value > _limits(info).max_tokens:
        raise ValueError(f"must be at most {_limits(info).max_tokens} (got {value})")
    return value


def _check_n(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"must be at least 1 (got {value})")
    if value is not None and value > 1:
        raise ValueError(f"only n=1 is supported: one choice per request (got {value})")
    return value


def _check_top_k(value: int | None) -> int | None:
    if value is not None and value != -1 and value < 1:
        raise ValueError(f"must be -1 or at least 1 (got {value})")
    return value


def _normalize_stop(value: Any, info: ValidationInfo) -> Any:
    """A string or a list of strings becomes a list; the list type checks the rest."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of strings")
    limits = _limits(info)
    if len(value) > limits.max_stop:
        raise ValueError(f"at most {limits.max_stop} stop sequences (got {len(value)})")
    for item in value:
        if isinstance(item, str) and not item:
            raise ValueError("stop sequences must not be empty")
        if isinstance(item, str) and len(item) > limits.max_stop_chars:
            raise ValueError(f"stop sequences must be at most {limits.max_stop_chars} characters")
    return value


def _check_text(value: str, info: ValidationInfo, what: str) -> str:
    limit = _limits(info).max_message_chars
    if len(value) > limit:
        raise ValueError(f"{what} longer than {limit} characters ({len(value)})")
    return value


#: Fields a DB-GPT worker cannot honour, refused when they ask for something
#: (their harmless values are accepted): name -> (is harmless, why).
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "tools": (lambda v: v is None or v == [], "tool calls are not supported by DB-GPT workers"),
    "functions": (lambda v: v is None or v == [], "function calls are not supported by DB-GPT workers"),
    "tool_choice": (lambda v: v is None or v in ("none", "auto"), "tool calls are not supported by DB-GPT workers"),
    "function_call": (lambda v: v is None or v in ("none", "auto"),
                      "function calls are not supported by DB-GPT workers"),
    "response_format": (lambda v: v is None or (isinstance(v, Mapping) and v.get("type") == "text"),
                        "only response_format {\"type\": \"text\"} is supported"),
    "logprobs": (lambda v: v is None or v is False or (type(v) is int and v == 0),
                 "logprobs are not supported by DB-GPT workers"),
    "top_logprobs": (lambda v: v is None or (type(v) is int and v == 0),
                     "logprobs are not supported by DB-GPT workers"),
    "logit_bias": (lambda v: v is None or v == {}, "logit_bias is not supported by DB-GPT workers"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is supported"),
    "suffix": (lambda v: v is None or v == "", "suffix is not supported by DB-GPT workers"),
    "best_of": (lambda v: v is None or (type(v) is int and v == 1), "only best_of=1 is supported"),
    "dimensions": (lambda v: v is None, "dimensions is not supported: a DB-GPT worker answers in its model's size"),
}


def _refuse_unsupported(value: Any, info: ValidationInfo) -> Any:
    harmless, why = _UNSUPPORTED[info.field_name]
    if not harmless(value):
        raise ValueError(why)
    return value


# ---- chat -------------------------------------------------------------------

#: OpenAI's roles -> DB-GPT's.
ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "ai"}


class ChatMessage(BaseModel):
    """One message; ``content`` is always a string once parsed (text parts
    joined with newlines; an assistant's ``null`` content is empty)."""

    model_config = _REQUEST

    role: str
    content: str
    name: str | None = None
    tool_calls: Any = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value in ("tool", "function"):
            raise ValueError(f"role '{value}' is not supported: DB-GPT workers take system, user and "
                             "assistant messages")
        if value not in ROLES:
            raise ValueError(f"must be one of {', '.join(ROLES)} (got {value[:40]!r})")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            if info.data.get("role") == "assistant":
                return ""
            raise ValueError("is required (null only in an assistant message)")
        if isinstance(value, list):
            texts = []
            for i, part in enumerate(value):
                if not isinstance(part, Mapping):
                    raise ValueError(f"part {i} must be an object {{\"type\": \"text\", \"text\": ...}}")
                kind = part.get("type")
                if kind != "text":
                    shown = kind[:40] if isinstance(kind, str) else type(kind).__name__
                    raise ValueError(f"part {i}: only text parts are supported (got type {shown!r})")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i}: text must be a string")
                texts.append(part["text"])
            value = "\n".join(texts)
        if isinstance(value, str):
            return _check_text(value, info, "content")
        raise ValueError("must be a string or a list of text parts")

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls(cls, value: Any) -> Any:
        if value is not None and value != []:
            raise ValueError("tool calls are not supported by DB-GPT workers")
        return value


class StreamOptions(BaseModel):
    model_config = _REQUEST

    include_usage: bool = False


class _Sampling(BaseModel):
    """The sampling fields chat and completions share (declaration order
    matters: ``stream`` is checked before ``stream_options``)."""

    model_config = _REQUEST

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_k: int | None = None  # not OpenAI's; vLLM's and DB-GPT's
    n: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    seed: int | None = None
    user: str | None = None
    logprobs: Any = None
    logit_bias: Any = None

    _model = field_validator("model")(_check_model)
    _max_tokens = field_validator("max_tokens")(_check_max_tokens)
    _n = field_validator("n")(_check_n)
    _top_k = field_validator("top_k")(_check_top_k)
    _stop = field_validator("stop", mode="before")(_normalize_stop)
    _unsupported = field_validator("logprobs", "logit_bias")(_refuse_unsupported)

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and info.data.get("stream") is not True:
            raise ValueError("is only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None  # meaningless without tools: accepted whatever it says
    response_format: Any = None
    top_logprobs: Any = None
    audio: Any = None
    modalities: Any = None

    _max_completion_tokens = field_validator("max_completion_tokens")(_check_max_tokens)
    _unsupported_chat = field_validator("tools", "functions", "tool_choice", "function_call", "response_format",
                                        "top_logprobs", "audio", "modalities")(_refuse_unsupported)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_count(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("must not be empty")
            if len(value) > _limits(info).max_messages:
                raise ValueError(f"at most {_limits(info).max_messages} messages (got {len(value)})")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens`` if given, else ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (one prompt per request)."""

    prompt: str
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: Any = None
    best_of: Any = None

    _unsupported_completion = field_validator("suffix", "best_of")(_refuse_unsupported)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):
            if value and all(type(v) is int for v in value):
                raise ValueError("token-id prompts are not supported: send text")
            if len(value) != 1:
                raise ValueError(f"one prompt per request: a string or a list of one string (got {len(value)})")
            value = value[0]
            if isinstance(value, int) or (isinstance(value, list) and value and isinstance(value[0], int)):
                raise ValueError("token-id prompts are not supported: send text")
            if not isinstance(value, str):
                raise ValueError("must be a string or a list of one string")
        if isinstance(value, str):
            return _check_text(value, info, "prompt")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``; ``input`` is always a list once parsed."""

    model_config = _REQUEST

    model: str
    input: list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Any = None
    user: str | None = None

    _model = field_validator("model")(_check_model)
    _unsupported = field_validator("dimensions")(_refuse_unsupported)

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of strings")
        limits = _limits(info)
        if not value:
            raise ValueError("must not be empty")
        if len(value) > limits.max_embedding_inputs:
            raise ValueError(f"at most {limits.max_embedding_inputs} inputs (got {len(value)})")
        for i, item in enumerate(value):
            if isinstance(item, int) or isinstance(item, list):
                raise ValueError("token-id inputs are not supported: send text")
            if isinstance(item, str):
                if not item:
                    raise ValueError(f"input {i} must not be an empty string")
                _check_text(item, info, f"input {i}")
        return value


# ---- parsing ---------------------------------------------------------------


def _parse(cls: type[BaseModel], body: bytes | str | Any, limits: OpenAILimits) -> Any:
    if isinstance(body, (bytes, bytearray, memoryview, str)):
        try:
            # json.loads, not pydantic's parser: that one refuses the lone
            # surrogates ("\ud800") Python's json writes (as in core/inference).
            body = json.loads(bytes(body) if not isinstance(body, str) else body)
        except (ValueError, RecursionError) as exc:
            error = PydanticCustomError("json_invalid", "the body is not valid JSON: {error}",
                                        {"error": str(exc)[:200]})
            raise ValidationError.from_exception_data(
                cls.__name__, [InitErrorDetails(type=error, loc=(), input=None)]) from None
    return cls.model_validate(body, context={"limits": limits})


def parse_chat(body: bytes | str | Any, limits: OpenAILimits = DEFAULT_LIMITS) -> ChatCompletionRequest:
    """A chat request from its raw body (bytes or str) or decoded JSON; raises
    only :class:`pydantic.ValidationError`."""
    return _parse(ChatCompletionRequest, body, limits)


def parse_completion(body: bytes | str | Any, limits: OpenAILimits = DEFAULT_LIMITS) -> CompletionRequest:
    """A completions request, as :func:`parse_chat`."""
    return _parse(CompletionRequest, body, limits)


def parse_embeddings(body: bytes | str | Any, limits: OpenAILimits = DEFAULT_LIMITS) -> EmbeddingRequest:
    """An embeddings request, as :func:`parse_chat`."""
    return _parse(EmbeddingRequest, body, limits)


# ---- to DB-GPT --------------------------------------------------------------


class _DbgptMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "human", "ai"]
    content: str


class PromptRequestBody(BaseModel):
    """DB-GPT 0.8.2's PromptRequest as this module sends it (extra fields
    forbidden, so a misspelt key fails the tests rather than being ignored by
    the worker)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[_DbgptMessage] = []
    prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    stop: str | list[str] | None = None
    echo: bool = True
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    chat_model: bool | None = True


class EmbeddingsRequestBody(BaseModel):
    """DB-GPT 0.8.2's EmbeddingsRequest as this module sends it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: list[str]
    worker_type: Literal["text2vec"] = "text2vec"


def _sampling(req: _Sampling, max_new_tokens: int | None) -> dict[str, Any]:
    """The sampling fields that were given (None is never sent: DB-GPT's
    adapters read a present ``None`` as a value). Unlike DB-GPT's API server,
    a temperature of 0 is sent."""
    fields = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
              "max_new_tokens": max_new_tokens, "stop": list(req.stop) if req.stop else None,
              "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty}
    return {k: v for k, v in fields.items() if v is not None}


def to_dbgpt_chat(req: ChatCompletionRequest, limits: OpenAILimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The PromptRequest body for ``/api/worker/generate_stream`` or
    ``/generate``: roles translated (:data:`ROLES`), ``echo`` false,
    ``max_new_tokens`` from the request or ``limits.default_max_tokens``."""
    max_new = req.max_new_tokens if req.max_new_tokens is not None else limits.default_max_tokens
    return {"model": req.model,
            "messages": [{"role": ROLES[m.role], "content": m.content} for m in req.messages],
            "echo": False, "chat_model": True, **_sampling(req, max_new)}


def to_dbgpt_completion(req: CompletionRequest) -> dict[str, Any]:
    """The PromptRequest body for a completion, as DB-GPT's own API server
    builds it: ``prompt``, ``chat_model`` false, ``echo`` as asked."""
    return {"model": req.model, "prompt": req.prompt, "echo": req.echo, "chat_model": False,
            **_sampling(req, req.max_new_tokens)}


def to_dbgpt_embeddings(req: EmbeddingRequest) -> dict[str, Any]:
    """DB-GPT's EmbeddingsRequest body for ``/api/worker/embeddings``."""
    return {"model": req.model, "input": list(req.input), "worker_type": "text2vec"}


def render_prompt(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> str:
    """The text a prefix-cache router hashes: for each message in order, its
    DB-GPT role, the length of its content, and the content —
    ``"{role}:{len}:{content}\\n"`` — so that

    * it is deterministic, and ``developer`` and ``system`` render alike;
    * requests sharing their first k messages share a prefix of this text
      (the rendering of a prefix of the messages is a prefix of the rendering),
      and the text of the first message that differs diverges no earlier than
      where the two contents do;
    * two different message lists never render the same (the lengths make the
      split between messages unambiguous).

    Messages may be parsed :class:`ChatMessage` or ``{role, content}`` dicts in
    OpenAI's or DB-GPT's roles. The text may hold lone surrogates from the JSON
    body: encode it with ``"utf-8", "surrogatepass"`` before hashing. For
    ``/v1/completions`` hash the prompt itself."""
    out = []
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, ChatMessage) else (m["role"], m["content"])
        out.append(f"{ROLES.get(role, role)}:{len(content)}:{content}\n")
    return "".join(out)


# ---- from DB-GPT ------------------------------------------------------------

_FINISH_REASONS = {"stop", "length", "content_filter", "tool_calls", "function_call"}
_COMPLETION_FINISH_REASONS = {"stop", "length", "content_filter"}


def _finish_reason(value: str | None, allowed: set[str] = _FINISH_REASONS) -> str:
    return value if value in allowed else "stop"


def _usage(usage: Mapping[str, Any] | None) -> dict[str, int] | None:
    """OpenAI's usage from DB-GPT's, or None when it has no token counts."""
    if not isinstance(usage, Mapping):
        return None

    def count(key: str) -> int | None:
        value = usage.get(key)
        return value if type(value) is int and value >= 0 else None

    prompt, completion, total = count("prompt_tokens"), count("completion_tokens"), count("total_tokens")
    if prompt is None and completion is None:
        return None
    prompt, completion = prompt or 0, completion or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": total if total is not None else prompt + completion}


def make_id(kind: Literal["chat", "completion"], token: str) -> str:
    """``chatcmpl-{token}`` or ``cmpl-{token}`` (the caller supplies the token,
    e.g. a random hex string)."""
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{token}"


class WorkerAnswerError(ValueError):
    """A worker's answer does not have the shape DB-GPT's protocol promises
    (the gateway answers 502 naming the worker)."""


class StreamTranslator:
    """DB-GPT ModelOutputs in, OpenAI stream chunks out, for one request.

    Call :meth:`feed` with each output as it arrives, then :meth:`finish` when
    the worker's stream ends, or :meth:`error` when it breaks. Each returns a
    list of dicts to send (frame them with :func:`sse`, then :data:`SSE_DONE`).

    * chat: a first chunk with ``delta.role = "assistant"`` (sent with the
      first output, even an empty one), then one chunk per output that adds
      text (``delta.content``; ``delta.reasoning_content`` when the worker sends
      thinking), then from :meth:`finish` a chunk with an empty delta and
      ``finish_reason``, then — when ``include_usage`` — a chunk with
      ``choices: []`` and ``usage`` (null when the worker reported none).
    * completion (``text_completion``): chunks with ``choices[0].text``; the
      finish chunk has ``text: ""``.
    * Text: an ``incremental`` output carries only its own text; otherwise the
      text so far. A cumulative text that does not extend what was already
      sent (a worker rewrote its output, e.g. trimmed a stop string) cannot be
      taken back from the client: only what goes beyond the length already
      sent is sent — DB-GPT's API server's rule, so a client sees the same text
      through either — and :attr:`rewrites` counts these. U+FFFD in cumulative
      texts (half a multi-byte character) is dropped, as DB-GPT's server does.
    * An output with ``error_code != 0`` becomes one ``{"error": {...}}``
      event naming the worker; after it, or after :meth:`finish` or
      :meth:`error`, the translator is :attr:`done` and returns nothing more.
    """

    def __init__(self, kind: Literal["chat", "completion"], *, id: str, model: str, created: int,
                 include_usage: bool = False, worker: str = "") -> None:
        self.kind, self.id, self.model, self.created = kind, id, model, created
        self.include_usage, self.worker = include_usage, worker
        self.text = ""  # what the client has been sent
        self.thinking = ""
        self.usage: dict[str, int] | None = None
        self.finish_reason: str | None = None
        self.rewrites = 0
        self.done = False
        self._started = False

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _choice(self, content: str | None, thinking: str | None, finish: str | None) -> dict[str, Any]:
        if self.kind == "completion":
            return {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}
        delta: dict[str, Any] = {}
        if content is not None:
            delta["content"] = content
        if thinking is not None:
            delta["reasoning_content"] = thinking
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    def _advance(self, previous: str, new: str, incremental: bool) -> tuple[str, str]:
        """(the delta, what the client has now)."""
        if incremental:
            return new, previous + new
        new = new.replace("\ufffd", "")
        if not new.startswith(previous):
            self.rewrites += 1
        delta = new[len(previous):]
        return delta, previous + delta

    def feed(self, output: ModelOutput) -> list[dict[str, Any]]:
        """The chunks one worker output becomes."""
        if self.done:
            return []
        if not output.success:
            return [self.error(output.text or f"error code {output.error_code}")]
        out = []
        if not self._started:
            self._started = True
            if self.kind == "chat":
                out.append(self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None, "logprobs": None}]))
        delta, self.text = self._advance(self.text, output.text, output.incremental)
        thinking = None
        if output.thinking is not None and self.kind == "chat":
            thinking, self.thinking = self._advance(self.thinking, output.thinking, output.incremental)
        if output.finish_reason:
            self.finish_reason = output.finish_reason
        self.usage = _usage(output.usage) or self.usage
        if delta or thinking:
            out.append(self._chunk([self._choice(delta or None, thinking or None, None)]))
        return out

    def finish(self) -> list[dict[str, Any]]:
        """The closing chunks: ``finish_reason``, then usage if asked."""
        if self.done:
            return []
        out = [] if self._started or self.kind != "chat" else self.feed(ModelOutput())
        self.done = True
        allowed = _FINISH_REASONS if self.kind == "chat" else _COMPLETION_FINISH_REASONS
        finish = _finish_reason(self.finish_reason, allowed)
        out.append(self._chunk([self._choice(None, None, finish)]))
        if self.include_usage:
            out.append(self._chunk([], usage=self.usage))
        return out

    def error(self, message: str, worker: str | None = None) -> dict[str, Any]:
        """The error event ending a stream (a failed output, or a stream the
        gateway saw break), naming the worker."""
        self.done = True
        return worker_error(message, worker if worker is not None else self.worker)[1]


def chat_completion_response(output: ModelOutput, model: str, id: str, created: int) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` for a successful DB-GPT output (check
    ``output.success`` first; a failure is :func:`worker_error`)."""
    if not output.success:
        raise ValueError("a failed output has no completion: answer worker_error(...)")
    message: dict[str, Any] = {"role": "assistant", "content": output.text}
    if output.thinking is not None:
        message["reasoning_content"] = output.thinking
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(output.finish_reason),
                         "logprobs": None}],
            "usage": _usage(output.usage)}


def completion_response(output: ModelOutput, model: str, id: str, created: int) -> dict[str, Any]:
    """OpenAI's ``text_completion`` for a successful DB-GPT output."""
    if not output.success:
        raise ValueError("a failed output has no completion: answer worker_error(...)")
    finish = _finish_reason(output.finish_reason, _COMPLETION_FINISH_REASONS)
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": output.text, "finish_reason": finish, "logprobs": None}],
            "usage": _usage(output.usage)}


def embeddings_response(vectors: Any, model: str, encoding_format: str = "float",
                        expected: int | None = None) -> dict[str, Any]:
    """OpenAI's embeddings list from DB-GPT's ``[[float]]`` answer; raises
    :class:`WorkerAnswerError` when the answer is not a list of (``expected``
    many) lists of finite numbers. ``base64``: little-endian float32, as OpenAI."""
    if not isinstance(vectors, list) or (expected is not None and len(vectors) != expected):
        count = len(vectors) if isinstance(vectors, list) else type(vectors).__name__
        raise WorkerAnswerError(f"expected a list of {expected if expected is not None else 'some'} vectors, "
                                f"got {count}")
    data = []
    for i, vector in enumerate(vectors):
        if not isinstance(vector, list) or not all(
                type(x) in (int, float) and math.isfinite(x) for x in vector):
            raise WorkerAnswerError(f"vector {i} is not a list of finite numbers")
        embedding: Any = [float(x) for x in vector]
        if encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *embedding)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}}


def models_response(models: Iterable[str], created: int = 0, owned_by: str = "DB-GPT") -> dict[str, Any]:
    """``GET /v1/models``: each model once, sorted."""
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": owned_by}
                                       for m in sorted(set(models))]}


# ---- errors -----------------------------------------------------------------


class Failure(NamedTuple):
    status: int
    type: str
    code: str | None


#: Our situations -> OpenAI's (status, type, code). The gateway adds
#: ``Retry-After`` to ``overloaded``.
FAILURES: dict[str, Failure] = {
    "bad_request": Failure(400, "invalid_request_error", None),
    "bad_key": Failure(401, "invalid_request_error", "invalid_api_key"),
    "not_found": Failure(404, "invalid_request_error", "unknown_url"),
    "unknown_model": Failure(404, "invalid_request_error", "model_not_found"),
    "method_not_allowed": Failure(405, "invalid_request_error", "method_not_allowed"),
    "body_too_large": Failure(413, "invalid_request_error", "request_too_large"),
    "overloaded": Failure(429, "requests", "rate_limit_exceeded"),
    "internal": Failure(500, "server_error", None),
    "worker_failed": Failure(502, "server_error", "worker_error"),
    "no_instance": Failure(503, "server_error", "no_instance"),
    "deadline": Failure(504, "server_error", "timeout"),
}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(situation: str, message: str, param: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for one of :data:`FAILURES`."""
    failure = FAILURES[situation]
    return failure.status, error_body(message, failure.type, param, failure.code)


def worker_error(message: str, worker: str = "") -> tuple[int, dict[str, Any]]:
    """A worker's failure (an output with ``error_code != 0``, a broken
    stream): 502, the message naming the worker."""
    where = f"worker {worker}" if worker else "the worker"
    return error_response("worker_failed", f"{where} failed: {message}")


def validation_error_body(exc: ValidationError) -> dict[str, Any]:
    """OpenAI's 400 body for a refused request: the first error's field as
    ``param`` (``"messages.0.role"``; None for the body as a whole), its
    message naming the field too."""
    first = exc.errors(include_url=False, include_input=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "is required"
    return error_body(f"{param}: {message}" if param else message, "invalid_request_error", param)


# ---- server-sent events ----------------------------------------------------

SSE_DONE = b"data: [DONE]\n\n"


def sse(data: Mapping[str, Any]) -> bytes:
    """One server-sent event: ``data: {json}\\n\\n`` (UTF-8; a text with lone
    surrogates is written with ASCII escapes instead)."""
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return b"data: " + text.encode("utf-8") + b"\n\n"
    except UnicodeEncodeError:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        return b"data: " + text.encode("ascii") + b"\n\n"
