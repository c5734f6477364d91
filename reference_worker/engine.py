"""A cost model of an LLM engine (vLLM-like) for the reference worker, so the
gateway's tests and benchmark need no GPU. Off unless ``WorkerSettings.engine``
is set (``--slots``, ``--cache-tokens``, ... on the command line).

What it models, per model a worker serves:

* **Slots**: at most ``slots`` requests run at once; the others wait for one in
  arrival order. Waiting and running requests are vLLM's
  ``num_requests_waiting`` and ``num_requests_running``.
* **A prefix cache**: an LRU of prompt blocks with a capacity in tokens. There
  is no tokenizer: **a token is 4 characters** (``tokens(text) = ceil(len/4)``).
  The rendered prompt (:func:`render_prompt`) is cut into blocks of
  ``block_chars`` characters, hashed as a chain as vLLM does (block *i*'s hash
  covers characters ``0 .. (i+1)*block_chars``), so equal hashes mean equal
  prefixes. Only full blocks are cached (a partial last block never is, as in
  vLLM). A request's cached prefix is its leading run of blocks found in the
  cache when it gets its slot. Once its prefill is done its blocks are in the
  cache (vLLM shares a block as soon as it is computed), the first block the
  most recently used, so when space runs out a prompt's tail goes before its
  head (vLLM frees a request's blocks in reverse order for the same reason).
* **Costs**: a prefill of ``prefill_ms_per_token`` per uncached prompt token
  and ``cached_prefill_ms_per_token`` per cached one, spent after getting a slot
  and before the first chunk; then ``decode_ms_per_chunk`` before every chunk.

The waits are ``asyncio.sleep``; hashing a 4,000-token prompt (16,000
characters) costs ~0.15 ms of CPU with 64-character blocks.

The benchmark's setting — 4,000-token tenant prompts, a cold prefill of ~1 s,
a cached one of ~20 ms, a worker caching 4 tenants' worth — is::

    EngineSettings(slots=8, cache_tokens=4 * 4_000 + 1_000, prefill_ms_per_token=0.25)

(the extra 1,000 tokens leave room for the requests' own questions).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, field_validator

#: Characters per token: the cost model counts tokens without a tokenizer.
CHARS_PER_TOKEN = 4


class EngineSettings(BaseModel):
    """The cost model's knobs (per worker; every model it serves gets its own engine)."""

    model_config = {"extra": "forbid"}

    #: Requests running at once; more wait for a slot, first come first served.
    slots: int = Field(8, ge=1)
    #: Prefix cache capacity in tokens (4 characters each); 0: no cache.
    cache_tokens: int = Field(16_384, ge=0)
    #: Prefill cost of an uncached prompt token, in milliseconds.
    prefill_ms_per_token: float = Field(0.25, ge=0)
    #: Prefill cost of a cached prompt token (a cache hit is not free), in milliseconds.
    cached_prefill_ms_per_token: float = Field(0.005, ge=0)
    #: Cost of each streamed chunk, in milliseconds (added to ``chunk_delay``).
    decode_ms_per_chunk: float = Field(10.0, ge=0)
    #: Characters per cached block: a multiple of 4 (64: vLLM's 16-token blocks).
    block_chars: int = Field(64, ge=CHARS_PER_TOKEN)

    @field_validator("block_chars")
    @classmethod
    def _whole_tokens(cls, value: int) -> int:
        if value % CHARS_PER_TOKEN:
            raise ValueError(f"must be a multiple of {CHARS_PER_TOKEN} (whole tokens), got {value}")
        return value

    @property
    def block_tokens(self) -> int:
        return self.block_chars // CHARS_PER_TOKEN

    @property
    def cache_blocks(self) -> int:
        """The cache's capacity in blocks (whole blocks only)."""
        return self.cache_tokens // self.block_tokens

    def prefill_seconds(self, prompt_tokens: int, cached_tokens: int) -> float:
        """What a prefill of ``prompt_tokens`` costs when ``cached_tokens`` of them are cached."""
        uncached = prompt_tokens - cached_tokens
        return (uncached * self.prefill_ms_per_token + cached_tokens * self.cached_prefill_ms_per_token) / 1000


# ---- pure: the prompt, its blocks, the cache --------------------------------


def tokens(text: str) -> int:
    """The cost model's token count: one per 4 characters, a partial one counted."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style parts
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def render_prompt(params: dict[str, Any]) -> str:
    """The prompt a DB-GPT generate request stands for: its ``prompt`` when
    given, else its ``messages`` in order, each as ``"{role}: {content}\\n"``."""
    prompt = params.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt
    messages = params.get("messages") or []
    return "".join(f"{m.get('role', '')}: {_content(m.get('content'))}\n" for m in messages if isinstance(m, dict))


def block_hashes(text: str, block_chars: int) -> list[bytes]:
    """The chained hashes of ``text``'s full blocks: the i-th covers
    ``text[: (i + 1) * block_chars]`` (a partial last block has none)."""
    out: list[bytes] = []
    previous = b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hashlib.blake2b(previous + text[start:start + block_chars].encode(), digest_size=8).digest()
        out.append(previous)
    return out


class PrefixCache:
    """An LRU of block hashes holding at most ``capacity`` blocks."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._blocks: OrderedDict[bytes, None] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: bytes) -> bool:
        return block in self._blocks

    def match(self, blocks: list[bytes]) -> int:
        """How many leading ``blocks`` are cached; those become the most recently used."""
        n = 0
        for block in blocks:
            if block not in self._blocks:
                break
            n += 1
        self._touch(reversed(blocks[:n]))
        return n

    def insert(self, blocks: list[bytes]) -> None:
        """Cache ``blocks`` (a prompt's, in order), the first the most recently
        used, evicting the least recently used beyond the capacity."""
        self._touch(reversed(blocks))
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def _touch(self, blocks: Iterable[bytes]) -> None:
        for block in blocks:
            self._blocks[block] = None
            self._blocks.move_to_end(block)


# ---- the engine: slots and costs ------------------------------------------


@dataclass
class EngineFigures:
    """What an engine has done so far (vLLM's load figures)."""

    waiting: int = 0
    running: int = 0
    #: Prompt tokens looked up in the prefix cache, and those found (counters).
    queried_tokens: int = 0
    hit_tokens: int = 0
    requests: int = 0  # requests that got a slot
    cache_usage: float = 0.0  # cached blocks / capacity, 0..1


@dataclass
class Admission:
    """One request's passage through the engine (kept in its journal entry)."""

    prompt_tokens: int
    cached_tokens: int = 0
    queued_s: float = 0.0  # seconds waiting for a slot
    prefill_s: float = 0.0  # the prefill's modelled cost
    chunks: int = 0
    t_slot: float | None = None  # wall-clock time the slot was taken, and given back
    t_done: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "queued_s": round(self.queued_s, 6), "prefill_s": round(self.prefill_s, 6),
                "chunks": self.chunks, "t_slot": self.t_slot, "t_done": self.t_done}


class Engine:
    """One model's slots and prefix cache. Use as::

        async with engine.admit(prompt) as admission:   # waits for a slot, then the prefill
            for chunk in ...:
                await engine.decode()                      # one chunk's cost
    """

    def __init__(self, settings: EngineSettings, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.settings = settings
        self.cache = PrefixCache(settings.cache_blocks)
        self._slots = asyncio.Semaphore(settings.slots)
        self._sleep = sleep
        self._figures = EngineFigures()

    def figures(self) -> EngineFigures:
        f = self._figures
        capacity = self.cache.capacity
        return EngineFigures(f.waiting, f.running, f.queried_tokens, f.hit_tokens, f.requests,
                             len(self.cache) / capacity if capacity else 0.0)

    def admit(self, prompt: str) -> _Admit:
        """An async context: wait for a slot (FIFO), pay the prefill, then hold the
        slot until the context ends (cancelled or not)."""
        return _Admit(self, prompt)

    async def decode(self, admission: Admission) -> None:
        """One streamed chunk's cost."""
        admission.chunks += 1
        if self.settings.decode_ms_per_chunk:
            await self._sleep(self.settings.decode_ms_per_chunk / 1000)


class _Admit:
    def __init__(self, engine: Engine, prompt: str) -> None:
        self.engine = engine
        self.prompt = prompt
        self.admission = Admission(prompt_tokens=tokens(prompt))
        self._held = False

    async def __aenter__(self) -> Admission:
        engine, a, figures = self.engine, self.admission, self.engine._figures
        blocks = block_hashes(self.prompt, engine.settings.block_chars)  # before queueing: CPU off the slot
        arrived = time.monotonic()
        figures.waiting += 1
        try:
            await engine._slots.acquire()
        finally:
            figures.waiting -= 1
        self._held = True
        figures.running += 1
        figures.requests += 1
        a.t_slot = time.time()
        a.queued_s = time.monotonic() - arrived
        try:
            a.cached_tokens = engine.cache.match(blocks) * engine.settings.block_tokens
            figures.queried_tokens += a.prompt_tokens
            figures.hit_tokens += a.cached_tokens
            a.prefill_s = engine.settings.prefill_seconds(a.prompt_tokens, a.cached_tokens)
            if a.prefill_s:
                await engine._sleep(a.prefill_s)
            engine.cache.insert(blocks)  # computed: shareable from now on
        except BaseException:
            self._release()
            raise
        return a

    async def __aexit__(self, *exc: Any) -> None:
        self._release()

    def _release(self) -> None:
        if self._held:
            self._held = False
            self.engine._figures.running -= 1
            self.admission.t_done = time.time()
            self.engine._slots.release()


def prometheus_text(engines: dict[str, Engine]) -> str:
    """vLLM's load figures in Prometheus' text format, labelled ``model_name``."""
    figures = {name: engine.figures() for name, engine in sorted(engines.items())}
    families = [
        ("vllm:num_requests_waiting", "gauge", "Requests waiting for a slot.", "", lambda f: f.waiting),
        ("vllm:num_requests_running", "gauge", "Requests holding a slot.", "", lambda f: f.running),
        ("vllm:kv_cache_usage_perc", "gauge", "Prefix cache usage (1 = full).", "", lambda f: f.cache_usage),
        ("vllm:prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache.", "_total",
         lambda f: f.queried_tokens),
        ("vllm:prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache.", "_total",
         lambda f: f.hit_tokens),
    ]
    lines = []
    for name, kind, help_, suffix, value in families:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for model, f in figures.items():
            label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{name}{suffix}{{model_name="{label}"}} {float(value(f))}')
    return "\n".join(lines) + "\n"
